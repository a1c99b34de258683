"""Binary lesion segmentation (``train.task=segmentation``): losses, metrics, plots and mask writing.

- :mod:`~fastlesion.segment.losses`: :func:`~fastlesion.segment.losses.create_seg_loss` (``optim.loss`` =
  ``dice_bce`` | ``dice`` | ``bce``) on mask logits ``N x 1 x H x W`` and masks in {0, 1}.
- :mod:`~fastlesion.segment.metrics`: per-image pixel counts (:func:`~fastlesion.segment.metrics.mask_stats`) and
  the means over images of Dice, IoU, the ISIC 2018 thresholded Jaccard, pixel accuracy, sensitivity and specificity
  (:func:`~fastlesion.segment.metrics.segmentation_metrics`).
- :mod:`~fastlesion.segment.plots`: validation images with true and predicted outlines.
- :mod:`~fastlesion.segment.predict`: flip TTA and PNG masks at the image's original size (the ISIC submission form).

The models are in :mod:`fastlesion.models` (``task="segmentation"`` entries); nothing here imports torch-heavy
modules when the package is imported.
"""

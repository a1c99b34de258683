"""DCT-scaled decoding (loader.dct_scaling): the same augmentation as a full decode, from fewer decoded pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import save_jpeg
from PIL import Image

from fastlesion.config import LoaderConfig
from fastlesion.data import decode
from fastlesion.data.torch_loader import TorchLoader, open_rgb
from fastlesion.data.transforms import MEAN, STD, eval_resize_size, eval_transform

SCALE, RATIO = (0.35, 1.0), (0.75, 4 / 3)


def _photo(path, width: int, height: int, orientation: int | None = None, seed: int = 0) -> str:
    """A JPEG with smooth, lesion-like content (low-frequency colour field + a dark ellipse), quality 90."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 64 + 2, width // 64 + 2, 3)) * 255
    img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[:height, :width]
    blob = ((xx - 0.45 * width) / (0.2 * width)) ** 2 + ((yy - 0.55 * height) / (0.25 * height)) ** 2 <= 1
    img = img.copy()
    img[blob] = (img[blob] * 0.35).astype(np.uint8)
    return save_jpeg(path, img, orientation)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return _photo(tmp_path_factory.mktemp("big") / "big.jpg", 2400, 1800)


def test_dct_factor_is_the_largest_reduction_keeping_enough_pixels():
    assert decode.dct_factor(2000, 224) == 8 and decode.dct_factor(1792, 224) == 8
    assert decode.dct_factor(1791, 224) == 4 and decode.dct_factor(896, 224) == 4
    assert decode.dct_factor(500, 224) == 2 and decode.dct_factor(447, 224) == 1
    assert decode.dct_factor(100, 224) == 1


@pytest.mark.parametrize("size", [(2400, 1800), (600, 450), (450, 600), (5000, 1000), (100, 900)])
def test_crop_window_is_v2_random_resized_crop_draw_for_draw(size):
    from torchvision.transforms import v2

    rrc = v2.RandomResizedCrop(224, scale=SCALE, ratio=RATIO)
    img = Image.new("RGB", size)
    for seed in range(200):
        torch.manual_seed(seed)
        want = rrc.make_params([img])
        torch.manual_seed(seed)
        got = decode.draw_crop(size[1], size[0], SCALE, RATIO)
        assert got == (want["top"], want["left"], want["height"], want["width"])
        assert torch.rand(1).item() == pytest.approx((torch.manual_seed(seed), rrc.make_params([img]),
                                                      torch.rand(1).item())[2])  # same draws consumed


def test_reduced_decode_keeps_the_crop_distribution_and_enough_pixels(big, monkeypatch):
    factors = []
    real = decode.decode_scaled

    def spy(im, orient, factor, *args, **kwargs):
        img, s = real(im, orient, factor, *args, **kwargs)
        factors.append((factor, s, img.size))
        return img, s

    monkeypatch.setattr(decode, "decode_scaled", spy)
    from torchvision.transforms import v2

    rrc, probe = v2.RandomResizedCrop(224, scale=SCALE, ratio=RATIO), Image.new("RGB", (2400, 1800))
    stats = {"fast": [], "v2": []}
    for seed in range(300):
        torch.manual_seed(seed)
        out, (top, left, h, w), size = decode.random_resized_crop(big, 224, SCALE, RATIO)
        assert out.shape == (3, 224, 224) and size == (2400, 1800)
        assert 0 <= top and top + h <= 1800 and 0 <= left and left + w <= 2400
        factor, s, decoded = factors[-1]
        assert s == 1 / factor and decoded == (-(-2400 // factor), -(-1800 // factor))
        assert min(h, w) * s >= 224  # the window still has >= image_size decoded pixels on its shorter side
        assert factor == decode.dct_factor(min(h, w), 224) and factor >= 4  # shortest crop side here >= 1065
        stats["fast"].append((h * w / (2400 * 1800), np.log(w / h), (left + w / 2) / 2400, (top + h / 2) / 1800))
        torch.manual_seed(10_000 + seed)  # v2 itself, on other seeds: an independent sample of its distribution
        p = rrc.make_params([probe])
        stats["v2"].append((p["height"] * p["width"] / (2400 * 1800), np.log(p["width"] / p["height"]),
                            (p["left"] + p["width"] / 2) / 2400, (p["top"] + p["height"] / 2) / 1800))
    fast, ref = np.array(stats["fast"]), np.array(stats["v2"])
    # relative area, log aspect ratio and centre: the same distribution (means within ~3 standard errors,
    # quartiles close), and inside the configured ranges
    assert fast[:, 0].min() >= 0.35 - 1e-3 and fast[:, 0].max() <= 1.0
    assert np.abs(fast[:, 1]).max() <= np.log(4 / 3) + 0.01
    se = ref.std(0) / np.sqrt(len(ref)) * np.sqrt(2)
    assert np.all(np.abs(fast.mean(0) - ref.mean(0)) < 3.5 * se), (fast.mean(0), ref.mean(0), se)
    q = [25, 50, 75]
    assert np.all(np.abs(np.percentile(fast, q, axis=0) - np.percentile(ref, q, axis=0)) < 0.08)
    assert {f for f, _, _ in factors} == {4, 8}


def _u8(img) -> np.ndarray:
    """A PIL image or a uint8 3 x H x W tensor as float32 H x W x 3."""
    if isinstance(img, torch.Tensor):
        return img.permute(1, 2, 0).numpy().astype(np.float32)
    return np.asarray(img, dtype=np.float32)


def test_reduced_crop_matches_full_decode_and_crop(big):
    """Same seed: the same window, and pixels within a few grey levels of a full decode + v2 resized crop."""
    from torchvision.transforms import v2

    rrc = v2.RandomResizedCrop(224, scale=SCALE, ratio=RATIO, antialias=True)
    full = open_rgb(big)
    diffs = []
    for seed in range(12):
        torch.manual_seed(seed)
        fast, window, _ = decode.random_resized_crop(big, 224, SCALE, RATIO)
        torch.manual_seed(seed)
        slow = rrc(full)
        torch.manual_seed(seed)
        plain, window2, _ = decode.random_resized_crop(big, 224, SCALE, RATIO, dct_scaling=False)
        assert window == window2
        diffs.append(np.abs(_u8(fast) - _u8(slow)).mean())
        assert np.abs(_u8(plain) - _u8(slow)).mean() < 0.5  # full decode: the same as v2 up to edge rounding
    assert max(diffs) < 3.0, diffs  # grey levels (0..255), mean absolute


def _window_from_whole_decode(path: str, seed: int, size: int = 224):
    """The DCT-scaled crop as it was before the early stop: the whole image decoded at the factor, then the window."""
    with Image.open(path) as im:
        torch.manual_seed(seed)
        top, left, h, w = decode.draw_crop(im.size[1], im.size[0], SCALE, RATIO)
        img, s = decode.decode_scaled(im, 1, decode.dct_factor(min(h, w), size))
        return _u8(decode._resize_box(img, s, (left, top, left + w, top + h), (size, size)))


def test_decoding_stops_below_the_window_and_the_output_is_bit_identical(big, monkeypatch):
    stops = []
    real = decode._load_rows

    def spy(im, rows):
        real(im, rows)
        stops.append((rows, im.size[1], np.asarray(im)[rows:].max(initial=0), np.asarray(im)[rows - 1].max()))

    monkeypatch.setattr(decode, "_load_rows", spy)
    for seed in range(40):
        torch.manual_seed(seed)
        fast, (top, _, h, _), _ = decode.random_resized_crop(big, 224, SCALE, RATIO)
        assert np.array_equal(_u8(fast), _window_from_whole_decode(big, seed)), seed
    stopped = [s for s in stops if s[0] < s[1]]
    assert len(stops) == 40 and len(stopped) >= 20  # most windows end above the image's bottom edge
    assert all(below == 0 and last > 0 for _, _, below, last in stopped)  # rows under the stop never decoded


def test_eval_window_stops_early_and_is_bit_identical(tmp_path, monkeypatch):
    path = _photo(tmp_path / "e.jpg", 1800, 2400, seed=3)
    fast = _u8(decode.resize_center_crop(path, 256, 224))
    monkeypatch.setattr(decode, "_load_rows", lambda im, rows: None)  # the whole image decoded at the scale
    assert np.array_equal(fast, _u8(decode.resize_center_crop(path, 256, 224)))


@pytest.mark.parametrize("size", [16, 64])
def test_early_stop_keeps_what_a_strong_reduction_reads(big, monkeypatch, size):
    """A small output from a large window (here up to 1800 / 8 / 16 = 14 decoded rows per output row): the rows the
    filter reads below the window are decoded too, so the output stays bit-identical."""
    for seed in range(10):
        torch.manual_seed(seed)
        fast = _u8(decode.random_resized_crop(big, size, SCALE, RATIO)[0])
        assert np.array_equal(fast, _window_from_whole_decode(big, seed, size)), seed


def test_a_file_cut_above_the_window_still_fails_and_one_cut_below_it_does_not(big, tmp_path, monkeypatch):
    data = open(big, "rb").read()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 3])  # the first third of the scan: rows below ~1/3 are missing
    window = {}

    def fixed_crop(height, width, scale, ratio):
        return window["top"], 0, window["h"], width // 2  # (top, left, h, w); the shorter side keeps factor 4

    monkeypatch.setattr(decode, "draw_crop", fixed_crop)
    window.update(top=0, h=1000)  # reaches far below the cut
    with pytest.raises(OSError, match="truncated"):
        decode.random_resized_crop(str(cut), 224, SCALE, RATIO)
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", True)  # a user's opt-in: grey rows, as PIL gives
    out, _, _ = decode.random_resized_crop(str(cut), 224, SCALE, RATIO)
    assert out.shape == (3, 224, 224) and open_rgb(str(cut)).size == (2400, 1800)
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", False)
    for h in (450, 300):  # end above the cut: every row they need is there (factor 2, and 1: libjpeg-turbo's whole
        window.update(top=0, h=h)  # decode reports the cut, and PIL decodes down to the window, as for factor 2)
        out, _, _ = decode.random_resized_crop(str(cut), 224, SCALE, RATIO)
        assert _u8(out).mean() > 20  # real pixels, not the black of undecoded rows
    assert decode.decode_whole(str(cut)) is None and decode.decode_whole(big) is not None
    with pytest.raises(OSError):  # the whole-image decode (plain path) fails on the same file
        open_rgb(str(cut))


def test_no_early_stop_for_png_grey_or_rotated_files(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "_load_rows", lambda im, rows: calls.append(im.format))
    src = Image.open(_photo(tmp_path / "p.jpg", 1200, 900))
    src.save(tmp_path / "p.png")
    src.convert("L").save(tmp_path / "g.jpg", quality=90)
    rotated = _photo(tmp_path / "r.jpg", 1200, 900, orientation=6)
    for path in (tmp_path / "p.png", tmp_path / "g.jpg", rotated):
        torch.manual_seed(0)
        out, _, _ = decode.random_resized_crop(str(path), 112, SCALE, RATIO)
        assert out.shape == (3, 112, 112) and out.dtype == torch.uint8
    assert calls == []  # PNG: no DCT; grey: not RGB; orientation 6: the window's rows are columns on disk


def test_orientation_is_applied_before_the_window(tmp_path):
    from torchvision.transforms import v2

    path = _photo(tmp_path / "rot.jpg", 1600, 1200, orientation=6)  # stored landscape, shown portrait
    rrc = v2.RandomResizedCrop(128, scale=SCALE, ratio=RATIO, antialias=True)
    upright = open_rgb(path)
    assert upright.size == (1200, 1600)
    for seed in range(6):
        torch.manual_seed(seed)
        fast, _, size = decode.random_resized_crop(path, 128, SCALE, RATIO)
        torch.manual_seed(seed)
        assert size == (1200, 1600) and np.abs(_u8(fast) - _u8(rrc(upright))).mean() < 3.0


def test_eval_resize_matches_the_plain_eval_transform(big, tmp_path):
    cfg = LoaderConfig(backend="torch")
    plain = eval_transform(cfg, 224)
    for path in (big, _photo(tmp_path / "tall.jpg", 900, 2000, seed=1), _photo(tmp_path / "s.jpg", 300, 260)):
        fast = decode.resize_center_crop(path, eval_resize_size(224, cfg.eval_crop), 224)
        assert fast.shape == (3, 224, 224)
        want = plain(open_rgb(path)) * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        got = torch.from_numpy(_u8(fast) / 255).permute(2, 0, 1)
        assert (got - want).abs().mean().item() < 3.0 / 255


def _table(paths, masks=None) -> pd.DataFrame:
    t = pd.DataFrame({"path": paths, "label": [i % 2 for i in range(len(paths))]})
    if masks is not None:
        t["mask"] = masks
    return t


@pytest.mark.parametrize("train", [True, False])
def test_loader_batches_with_and_without_dct_scaling_agree(tmp_path, train):
    paths = [_photo(tmp_path / f"{i}.jpg", 1800 + 200 * i, 1350 + 150 * i, seed=i) for i in range(4)]
    batches = []
    for dct in (True, False):
        cfg = LoaderConfig(backend="torch", workers=0, batch_size=4, dct_scaling=dct)
        loader = TorchLoader(_table(paths), cfg, 96, train=train)
        batches.append(next(iter(loader))[0])
    assert batches[0].shape == batches[1].shape == (4, 3, 96, 96)
    # the same draws (crop, flips, rotation, jitter) on slightly different pixels: normalised units, ~57 grey levels
    assert (batches[0] - batches[1]).abs().mean().item() < 0.06


def test_segmentation_mask_follows_the_reduced_decode_window(tmp_path):
    """An image whose dark ellipse is its mask: after the DCT-scaled crop the mask still covers the dark pixels,
    and it is the mask the plain path cuts with the same seed."""
    paths, masks = [], []
    for i in range(4):
        p = _photo(tmp_path / f"{i}.jpg", 2000, 1500, seed=i)
        yy, xx = np.mgrid[:1500, :2000]
        blob = ((xx - 0.45 * 2000) / (0.2 * 2000)) ** 2 + ((yy - 0.55 * 1500) / (0.25 * 1500)) ** 2 <= 1
        Image.fromarray((blob * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(p)
        masks.append(str(tmp_path / f"{i}.png"))
    out = {}
    for dct in (True, False):
        for train in (True, False):
            cfg = LoaderConfig(backend="torch", workers=0, batch_size=4, dct_scaling=dct, aug_strength=0)
            out[dct, train] = next(iter(TorchLoader(_table(paths, masks), cfg, 128, train=train)))
    for train in (True, False):
        (xf, mf, _), (xp, mp, _) = out[True, train], out[False, train]
        assert mf.shape == (4, 1, 128, 128) and set(mf.unique().tolist()) <= {0.0, 1.0}
        inter, union = (mf * mp).sum().item(), ((mf + mp) > 0).sum().item()
        assert inter / union > 0.98
        assert (xf - xp).abs().mean().item() < 0.06
        grey = xf.mean(1, keepdim=True)  # normalised; the lesion is dark
        assert grey[mf > 0].mean() < grey[mf == 0].mean() - 0.5


def test_auto_picks_the_path_by_device_and_image_size(tmp_path, monkeypatch, capsys):
    import fastlesion.data.loader as loader_mod

    big_paths = [_photo(tmp_path / f"b{i}.jpg", 2400, 1800, seed=i) for i in range(3)]
    small_paths = [_photo(tmp_path / f"s{i}.jpg", 600, 450, seed=i) for i in range(3)]
    monkeypatch.setattr(loader_mod, "resolve_dali_device", lambda cfg: "cpu")
    monkeypatch.setattr(loader_mod, "dali_available", lambda: True)
    auto = LoaderConfig()
    backend, line = loader_mod.choose_backend(auto, _table(big_paths), 224)
    assert backend == "torch"
    assert line == "loader: auto -> torch with DCT-scaled decoding (median image 2400x1800 px, CPU)"
    backend, line = loader_mod.choose_backend(auto, _table(small_paths), 224)
    assert backend == "dali" and line == "loader: auto -> dali on CPU threads (median image 600x450 px, CPU)"
    assert loader_mod.choose_backend(LoaderConfig(dct_scaling=False), _table(big_paths), 224)[0] == "dali"
    # crops and flips only (no rotation, no colour jitter): torch at any size, for classification
    flips_only = LoaderConfig(aug_strength=0)
    backend, line = loader_mod.choose_backend(flips_only, _table(small_paths), 224)
    assert backend == "torch" and line == ("loader: auto -> torch with DCT-scaled decoding (median image 600x450 px, "
                                           "CPU; crops and flips only)")
    assert loader_mod.choose_backend(LoaderConfig(rotate=0, brightness=0, contrast=0, saturation=0, hue=0),
                                     _table(small_paths), 224)[0] == "torch"
    assert loader_mod.choose_backend(LoaderConfig(hue=0), _table(small_paths), 224)[0] == "dali"  # jitter left
    seg = _table(small_paths, masks=small_paths)
    assert loader_mod.choose_backend(flips_only, seg, 224)[0] == "dali"  # measured for classification only
    assert loader_mod.choose_backend(LoaderConfig(aug_strength=0, dct_scaling=False), _table(small_paths),
                                     224)[0] == "dali"
    # the measured crossover: DALI on 1200x900 (shorter side 4.0 x 224), torch from 5 x 224 = 1120 px up
    mid_paths = [_photo(tmp_path / f"m{i}.jpg", 1200, 900, seed=i) for i in range(3)]
    assert loader_mod.choose_backend(auto, _table(mid_paths), 224)[0] == "dali"
    assert loader_mod.choose_backend(auto, _table(mid_paths), 180)[0] == "torch"  # 900 >= 5 x 180
    assert loader_mod.choose_backend(LoaderConfig(backend="dali"), _table(big_paths), 224) == ("dali", None)
    assert loader_mod.choose_backend(LoaderConfig(backend="torch"), _table(small_paths), 224) == ("torch", None)
    monkeypatch.setattr(loader_mod, "resolve_dali_device", lambda cfg: "gpu")
    assert loader_mod.choose_backend(auto, _table(big_paths), 224)[0] == "dali"
    monkeypatch.setattr(loader_mod, "resolve_dali_device", lambda cfg: "cpu")
    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    monkeypatch.setattr(loader_mod, "_warned", True)
    assert loader_mod.choose_backend(auto, _table(small_paths), 224)[1].endswith("DALI not installed)")
    monkeypatch.setattr(loader_mod, "_said", set())
    cfg = LoaderConfig(workers=0, batch_size=2)
    for _ in range(2):
        assert isinstance(loader_mod.build_loader(_table(big_paths), cfg, 224, train=False), TorchLoader)
    assert capsys.readouterr().out.count("loader: auto -> torch with DCT-scaled decoding") == 1


def test_grey_jpeg_and_png_take_the_same_path(tmp_path):
    """A greyscale JPEG is drafted and turned RGB; a PNG (no DCT scaling) is decoded in full, with the same window."""
    Image.new("L", (1600, 1200), 90).save(tmp_path / "grey.jpg", quality=90)
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(tmp_path / "flat.png")
    for name, colour in (("grey.jpg", (90, 90, 90)), ("flat.png", (10, 200, 30))):
        torch.manual_seed(3)
        img, window, size = decode.random_resized_crop(str(tmp_path / name), 64, SCALE, RATIO)
        torch.manual_seed(3)
        assert window == decode.draw_crop(1200, 1600, SCALE, RATIO) and size == (1600, 1200)
        assert img.shape == (3, 64, 64)
        assert np.abs(_u8(img) - np.array(colour, np.float32)).max() <= 2


def test_whole_decodes_go_through_libjpeg_turbo_and_match_the_pil_path(tmp_path, monkeypatch):
    """A window that needs the whole image (no DCT reduction) of a plain JPEG: simplejpeg decodes it and torch's uint8
    kernel resizes it; the same window and, within a grey level on average, the pixels of the PIL path."""
    small = _photo(tmp_path / "s.jpg", 600, 450, seed=4)
    calls = []
    real = decode.decode_whole
    monkeypatch.setattr(decode, "decode_whole", lambda path: calls.append(path) or real(path))
    turbo = {}
    for seed in range(8):
        torch.manual_seed(seed)
        turbo[seed] = decode.random_resized_crop(small, 224, SCALE, RATIO)
    assert len(calls) == 8  # 600x450: every window's shorter side is below 2 x 224
    monkeypatch.setattr(decode, "turbo", lambda: None)  # as without simplejpeg installed: PIL decodes
    for seed in range(8):
        torch.manual_seed(seed)
        out, window, size = decode.random_resized_crop(small, 224, SCALE, RATIO)
        assert window == turbo[seed][1] and size == turbo[seed][2] == (600, 450)
        assert out.shape == turbo[seed][0].shape == (3, 224, 224)
        assert np.abs(_u8(out) - _u8(turbo[seed][0])).mean() < 1.0
    assert len(calls) == 8


def test_grey_rotated_and_png_files_are_not_given_to_libjpeg_turbo(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "decode_whole", lambda path: calls.append(path))
    Image.new("L", (600, 450), 90).save(tmp_path / "grey.jpg", quality=90)
    Image.open(_photo(tmp_path / "p.jpg", 600, 450)).save(tmp_path / "p.png")
    rotated = _photo(tmp_path / "r.jpg", 600, 450, orientation=6)
    for path in (tmp_path / "grey.jpg", tmp_path / "p.png", rotated):
        torch.manual_seed(0)
        assert decode.random_resized_crop(str(path), 112, SCALE, RATIO)[0].shape == (3, 112, 112)
        assert decode.resize_center_crop(str(path), 128, 112).shape == (3, 112, 112)
    assert calls == []


def test_normalize_uint8_is_v2_to_image_to_dtype_normalize():
    from torchvision.transforms import v2

    from fastlesion.data.transforms import NormalizeUint8

    x = torch.randint(0, 256, (4, 3, 20, 30), dtype=torch.uint8)
    ref = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    want = torch.stack([ref(img) for img in x])
    got = NormalizeUint8()(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(NormalizeUint8()(x[0]), want[0], atol=1e-5)


def test_after_crop_goes_through_pil_only_for_rotation_or_jitter():
    from torchvision.transforms import v2

    from fastlesion.data.transforms import after_crop

    names = [type(t).__name__ for t in after_crop(LoaderConfig()).transforms]
    assert names[0] == "ToPILImage" and names[-1] == "PILToTensor" and "ColorJitter" in names
    assert [type(t).__name__ for t in after_crop(LoaderConfig(aug_strength=0)).transforms] == \
        ["RandomHorizontalFlip", "RandomVerticalFlip"]
    assert after_crop(LoaderConfig(aug_strength=0, hflip=0, vflip=0)) is None
    out = after_crop(LoaderConfig())(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert isinstance(after_crop(LoaderConfig()), v2.Compose)


def test_the_dct_loader_moves_uint8_through_the_workers_and_yields_normalised_floats(tmp_path):
    paths = [_photo(tmp_path / f"{i}.jpg", 600, 450, seed=i) for i in range(4)]
    for train in (True, False):
        loader = TorchLoader(_table(paths), LoaderConfig(backend="torch", workers=0, batch_size=4), 64, train=train)
        assert loader.normalize is not None
        x, y, idx = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape == (4, 3, 64, 64) and -2.2 < x.min() and x.max() < 2.7
        item = loader.dataset[(0, 1)][0]
        assert item.dtype == torch.uint8 and item.shape == (3, 64, 64)
    plain = TorchLoader(_table(paths), LoaderConfig(backend="torch", workers=0, dct_scaling=False), 64, train=True)
    assert plain.normalize is None and plain.dataset[(0, 1)][0].dtype == torch.float32

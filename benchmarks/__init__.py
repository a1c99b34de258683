"""Throughput benchmarks (train-step matrix, end-to-end from JPEGs) and the cross-machine comparison.

Run as scripts from the repository root: ``python benchmarks/train_throughput.py``, ``python benchmarks/end_to_end.py``,
``python benchmarks/compare.py FILES...``.
"""

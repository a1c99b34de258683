"""Datasets: catalog, splits, synthetic data, checker and loaders."""

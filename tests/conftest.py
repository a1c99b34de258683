"""Shared fixtures: tiny synthetic datasets (generated once per session) and an isolated cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep ~/.cache/fastlesion untouched: the synthetic default set and folds go to a temp cache."""
    old = os.environ.get("FASTLESION_CACHE")
    os.environ["FASTLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(2)
    yield
    if old is None:
        os.environ.pop("FASTLESION_CACHE", None)
    else:
        os.environ["FASTLESION_CACHE"] = old


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Default run folders (runs/...) land in the test's temp folder, never in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_isic(tmp_path_factory) -> Path:
    """ISIC 2020 layout, 80 images of 64x48, 30 % positives, several images per patient."""
    from fastlesion.data.synthetic import generate

    return generate("isic2020", tmp_path_factory.mktemp("isic"), n=80, seed=1, size=64, positive_rate=0.3)


@pytest.fixture(scope="session")
def tiny_ham(tmp_path_factory) -> Path:
    """HAM10000 layout, 140 images of 48x36, all seven classes."""
    from fastlesion.data.synthetic import generate

    return generate("ham10000", tmp_path_factory.mktemp("ham"), n=140, seed=2, size=48)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HOME in tmp_path and offline mode, in the environment and in huggingface_hub's constants (read once when
    it is imported, which an earlier test may have done); fill it with ``helpers.fill_hf_cache``."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two spinning threads make tiny steps 10-50x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

"""The user-facing commands as a user types them: synth, check (exit status), prepare, models."""

from pathlib import Path

from PIL import Image

from fastlesion.cli import main


def test_synth_check_prepare(tmp_path, capsys):
    root = tmp_path / "isic"
    assert main(["synth", "--layout", "isic2020", "--out", str(root), "--n", "12", "--size", "64",
                 "--positive-rate", "0.3", "--workers", "1"]) == 0
    assert (root / "train.csv").is_file() and (root / "test.csv").is_file()
    assert main(["check", str(root), "--quiet", "--workers", "1"]) == 0
    first = sorted((root / "train").iterdir())[0]
    first.write_bytes(first.read_bytes()[:200])  # truncate one JPEG
    assert main(["check", str(root), "--quiet", "--workers", "1"]) == 1
    assert "truncated" in capsys.readouterr().out
    assert (root / "exclude.txt").read_text().splitlines()[-1] == f"train/{first.name}"

    out = tmp_path / "small"
    # exit status 1: the truncated file cannot be resized
    assert main(["prepare", str(root), "--size", "32", "--out", str(out), "--quiet", "--workers", "1"]) == 1
    good = sorted((out / "train").iterdir())[-1]
    assert min(Image.open(good).size) == 32 and (out / "train.csv").is_file()


def test_models_lists_names(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("lenet", "resnet18", "efficientnet_b0", "densenet121", "mobilenetv2_100"):
        assert name in out


def test_synth_ham_layout(tmp_path):
    root = tmp_path / "ham"
    args = ["synth", "--layout", "ham10000", "--out", str(root), "--n", "20", "--size", "48", "--workers", "1"]
    assert main(args) == 0
    assert (root / "HAM10000_metadata.csv").is_file() and Path(root / "HAM10000_images_part_1").is_dir()

import pytest

from fastlesion.cli import main
from fastlesion.config import Config, ConfigError, load_config, replace, save_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=3e-4", "model.name=lenet", "loader.scale=0.2,0.9", "train.patience=2",
                             "run.quiet=true", "optim.clip_grad=none"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.name == "lenet"
    assert cfg.loader.scale == (0.2, 0.9)
    assert cfg.train.patience == 2 and cfg.run.quiet is True and cfg.optim.clip_grad is None


def test_yaml_round_trip(tmp_path):
    cfg = replace(Config(), **{"optim.lr": 0.01, "data.dataset": "csv", "data.csv": "x.csv", "loader.scale": (0.5, 1)})
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize("override,match", [
    (["optim.lrr=1"], "optim.lrr"),
    (["nosection.x=1"], "nosection.x"),
    (["train.epochs=abc"], "train.epochs"),
    (["train.epochs=1.5"], "train.epochs"),
    (["run.quiet=maybe"], "run.quiet"),
    (["data.dataset=imagenet"], "data.dataset"),
    (["optim.name=lion"], "optim.name"),
    (["loader.scale=0.5"], "loader.scale"),
    (["data.fold=7"], "data.fold"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_bad_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 0.1\n  foo: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.foo"):
        load_config(p)
    p.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(p)
    p.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_cli_errors_are_one_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochz: 3\n")
    assert main(["config", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.epochz" in err[0] and "Traceback" not in err[0]
    assert main(["config", "--optim.lr", "fast"]) == 2
    assert main(["config", "--model", "lenet", "--optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "name: lenet" in out and "lr: 0.5" in out


def test_reference_lists_every_key(capsys):
    assert main(["config", "--reference"]) == 0
    out = capsys.readouterr().out
    for key in ("data.dataset", "loader.backend", "optim.lr", "train.amp", "run.out", "model.pretrained_path"):
        assert f"`{key}`" in out


@pytest.mark.parametrize("text,match", [
    ("optim: 3\n", r"bad\.yaml: section 'optim' must be a mapping of keys .*got 3"),
    ("optim: [[lr, 0.1]]\n", r"bad\.yaml: section 'optim' must be a mapping of keys .*got \[\['lr', 0\.1\]\]"),
    ("train:\n  epochs: 2\ndata: fast\n", r"bad\.yaml: section 'data' must be a mapping of keys .*got 'fast'"),
    ("- optim\n- train\n", r"bad\.yaml: expected a mapping of sections .*got \['optim', 'train'\]"),
    ("hello\n", r"bad\.yaml: expected a mapping of sections .*got 'hello'"),
    ("0\n", r"bad\.yaml: expected a mapping of sections .*got 0"),
    ("[]\n", r"bad\.yaml: expected a mapping of sections .*got \[\]"),
])
def test_yaml_that_is_not_a_mapping(tmp_path, capsys, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)
    assert main(["config", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], err


def test_empty_yaml_and_empty_section_are_the_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    for text in ("", "# nothing yet\n", "optim:\n"):
        p.write_text(text)
        assert load_config(p) == Config()

"""The README's first commands and its config reference stay true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ref", ROOT / "tools" / "update_readme_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    text = (ROOT / "README.md").read_text()
    assert ref.updated(text) == text, "README config reference is stale: run python tools/update_readme_reference.py"


def test_first_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    cmds = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert 'pip install -e ".[dev]"' in cmds[0] and "venv" in cmds[0]
    assert cmds[1].startswith("fastlesion train")
    assert cmds[2] == "python -m pytest -q"
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()

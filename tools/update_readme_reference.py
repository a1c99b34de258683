"""Regenerate the configuration reference table in README.md from the config dataclasses.

Usage: python tools/update_readme_reference.py   (tests/test_readme.py fails when the README is stale)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastlesion.config import describe  # noqa: E402

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def reference_table() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in describe():
        lines.append(f"| `{key}` | {tp} | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines)


def updated(readme: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{reference_table()}\n{END}{tail}"


if __name__ == "__main__":
    path = ROOT / "README.md"
    text = path.read_text()
    if BEGIN not in text:
        sys.exit(f"{path}: no {BEGIN} marker")
    path.write_text(updated(text))
    print(f"updated {path}")

"""Merge benchmark results from several machines into one table and one bar chart per model.

Rows of ``train_throughput.py``, ``end_to_end.py`` and ``loader_throughput.py`` (JSON lines) are grouped by machine:
by the row's hardware fingerprint (software versions left out), shown as a label (GPU name, or CPU model and host;
machines whose labels are equal but whose fingerprints differ get `` #<6 hex digits of the fingerprint>`` appended),
then pivoted: one line per (benchmark, model, mode or
backend, image size, requested batch size), one column per machine with the metric and its ratio to the reference
machine (the first one unless ``--reference`` names another). Repeated measurements of one case on one machine are
merged by their median; only rows with ``status == "ok"`` count.

    python benchmarks/compare.py results/a100.jsonl results/h100.jsonl results/laptop.jsonl --reference A100
    python benchmarks/compare.py results/*.jsonl --out compare/ --metric fraction_of_synthetic

Writes ``comparison.csv``, ``comparison.md`` and ``<model>.png`` (values normalised to the reference) into ``--out``
and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from benchmarks import common  # noqa: E402

KEY = ["bench", "model", "config", "image_size", "batch_size"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", help="JSON-lines result files (--out of the benchmarks)")
    p.add_argument("--reference", default=None, help="reference machine: a (case-insensitive) part of its label, "
                                                     "its position (0 = first) or one of the FILES (default: first)")
    p.add_argument("--out", default="bench-compare", help="output folder (default: bench-compare)")
    p.add_argument("--metric", default="images_per_s", help="row field compared (default: images_per_s)")
    p.add_argument("--label", action="append", default=[], metavar="FILE=NAME",
                   help="name the machine of FILE yourself (repeatable)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    return p.parse_args(argv)


SOFTWARE_KEYS = frozenset({"python", "platform", "torch", "torchvision", "dali", "timm", "pillow", "simplejpeg",
                           "numpy", "torch_cuda", "gpu_driver", "cuda_version", "note"})
"""Fingerprint keys that name software, not the machine: a new torch or driver on one machine stays one machine."""


def row_machine(row: dict[str, Any]) -> str:
    fp = row.get("fingerprint")
    if isinstance(fp, dict) and fp and "error" not in fp:
        return common.machine_label(fp)
    return str(row.get("machine") or row.get("device_name") or "unknown machine")


def machine_key(row: dict[str, Any]) -> str:
    """What tells machines apart: the row's hardware fingerprint (software versions and empty values left out), or
    its label where the row has no usable fingerprint."""
    fp = row.get("fingerprint")
    if isinstance(fp, dict) and fp and "error" not in fp:
        hw = {k: v for k, v in fp.items() if k not in SOFTWARE_KEYS and v not in (None, "", [], {})}
        return "fp:" + json.dumps(hw, sort_keys=True, default=str)
    return "label:" + row_machine(row)


def machine_names(keyed: list[tuple[str, str]]) -> dict[str, str]:
    """``{key: name}`` for ``(key, label)`` pairs in order of first appearance: the label, with `` #<hash>`` (6 hex
    digits of the fingerprint) appended where machines with different fingerprints share a label."""
    labels: dict[str, str] = {}
    for key, label in keyed:
        labels.setdefault(key, label)
    count: dict[str, int] = {}
    for label in labels.values():
        count[label] = count.get(label, 0) + 1
    return {key: label if count[label] == 1 else f"{label} #{hashlib.sha1(key.encode()).hexdigest()[:6]}"
            for key, label in labels.items()}


def file_machines(files: list[str], labels: dict[str, str] | None = None) -> dict[tuple[str, str], str]:
    """The machine name of every (file, machine key) in ``files``: ``--label`` names first, then fingerprints
    (equal labels of different fingerprints disambiguated by :func:`machine_names`)."""
    labels = labels or {}
    keyed: list[tuple[str, str]] = []
    seen: list[tuple[str, str]] = []
    for f in files:
        own = labels.get(f) or labels.get(str(Path(f).resolve()))
        for r in common.read_jsonl(f):
            key = "file:" + own if own else machine_key(r)
            keyed.append((key, own or row_machine(r)))
            seen.append((f, key))
    names = machine_names(keyed)
    return {(f, key): names[key] for f, key in seen}


def row_config(row: dict[str, Any]) -> str:
    """``<mode>`` (train-step rows), ``<backend> <mode>`` (end-to-end), ``<backend-device> <scale>`` (loader; with
    `` aug<strength>`` when its ``--aug-strength`` was not the default 1, so that a run with crops and flips only is
    never averaged with one of the full augmentation)."""
    mode = str(row.get("mode") or "")
    if row.get("bench") == "loader_throughput":
        strength = (row.get("settings") or {}).get("aug_strength", 1.0)
        aug = f" aug{strength:g}" if strength is not None and float(strength) != 1.0 else ""
        return f"{mode} {row.get('image_scale', '')}".strip() + aug
    if row.get("bench") == "end_to_end" or row.get("backend"):
        return f"{row.get('backend', '?')} {mode}".strip()
    return mode


def load_rows(files: list[str], labels: dict[str, str], metric: str) -> tuple[pd.DataFrame, list[str], dict]:
    """Rows of all files as a frame (one line per measurement) and machines in order of first appearance."""
    records, machines, files_of, seen_metric = [], [], {}, False
    names = file_machines(files, labels)
    for f in files:
        rows = common.read_jsonl(f)
        if not rows:
            print(f"warning: {f}: no rows", file=sys.stderr)
        own = labels.get(f) or labels.get(str(Path(f).resolve()))
        for r in rows:
            missing = [k for k in common.REQUIRED_KEYS if k not in r]
            if missing:
                print(f"warning: {f}: a row without {missing} skipped", file=sys.stderr)
                continue
            machine = names[(f, "file:" + own if own else machine_key(r))]
            if machine not in machines:
                machines.append(machine)
            files_of.setdefault(machine, set()).add(f)
            value = r.get(metric)
            seen_metric = seen_metric or metric in r
            ok = r.get("status", "ok") == "ok" and isinstance(value, (int, float)) and math.isfinite(value)
            records.append({"machine": machine, "bench": r.get("bench") or "train_step", "model": r["model"],
                            "config": row_config(r), "image_size": r.get("image_size"),
                            "batch_size": r.get("requested_batch_size") or r["batch_size"],
                            "value": float(value) if ok else math.nan, "device_name": r["device_name"]})
    if records and not seen_metric:
        raise common.BenchmarkError(f"--metric {metric!r}: no result row has it (e.g. images_per_s)")
    frame = pd.DataFrame.from_records(records, columns=["machine", *KEY, "value", "device_name"])
    return frame, machines, files_of


def pick_reference(ref: str | None, machines: list[str], files_of: dict[str, set]) -> str:
    if not machines:
        raise common.BenchmarkError("no result rows found")
    if ref is None:
        return machines[0]
    if ref.isdigit() and int(ref) < len(machines):
        return machines[int(ref)]
    for m in machines:  # a result file: its path, its name or its name without the suffix (``lab.jsonl``, ``lab``)
        files = files_of.get(m, ())
        if ref in files or Path(ref).resolve() in {Path(f).resolve() for f in files} \
                or ref in {Path(f).name for f in files} or ref in {Path(f).stem for f in files}:
            return m
    hits = [m for m in machines if ref.lower() in m.lower()]
    if len(hits) == 1:
        return hits[0]
    what = "matches several machines" if hits else "matches no machine"
    raise common.BenchmarkError(f"--reference {ref!r} {what}; machines: {'; '.join(machines)}")


def pivot(frame: pd.DataFrame, machines: list[str], reference: str) -> pd.DataFrame:
    """One line per case: ``<machine>`` = median metric, ``<machine> / ref`` = ratio to the reference machine."""
    ok = frame.dropna(subset=["value"])
    if ok.empty:
        return pd.DataFrame(columns=KEY)
    keyed = ok.fillna({"image_size": -1})
    table = keyed.pivot_table(index=KEY, columns="machine", values="value", aggfunc="median")
    table = table.reindex(columns=[m for m in machines if m in table.columns])
    out = table.copy()
    for m in table.columns:
        ref = table[reference] if reference in table.columns else math.nan
        out[f"{m} / ref"] = table[m] / ref
    out = out.reset_index()
    out["image_size"] = out["image_size"].map(lambda v: None if v == -1 else int(v))
    # rows in a stable, readable order: benchmark, model, then configuration as measured
    out["_e2e"] = out["bench"] != "train_step"  # train-step rows first, then end-to-end
    out = out.sort_values(["_e2e", "bench", "model", "image_size", "batch_size", "config"], kind="stable",
                          na_position="first")
    return out.drop(columns="_e2e").reset_index(drop=True)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def cell(table: pd.DataFrame, i: int, m: str) -> str:
    v, r = table.at[i, m], table.at[i, f"{m} / ref"]
    return "-" if not math.isfinite(v) else f"{v:.1f} ({_fmt(r, '.2f')}x)" if math.isfinite(r) else f"{v:.1f}"


def write_markdown(path: Path, table: pd.DataFrame, machines: list[str], reference: str, metric: str,
                   details: dict[str, str], overall: dict[str, float] | None = None) -> None:
    present = [m for m in machines if m in table.columns]
    lines = [f"Metric: `{metric}` (ratio to the reference machine in brackets). Reference: **{reference}**.", ""]
    for i, m in enumerate(present, 1):
        geo = (overall or {}).get(m, math.nan)
        lines.append(f"- M{i}: {m}" + (f" ({details[m]})" if details.get(m) else "")
                     + (f"; geometric mean vs reference {geo:.2f}x" if math.isfinite(geo) else ""))
    lines += ["", "| benchmark | model | mode / backend | size | batch | " + " | ".join(f"M{i}" for i in
                                                                                     range(1, len(present) + 1)) + " |",
              "|---|---|---|---|---|" + "---|" * len(present)]
    for i in range(len(table)):
        lines.append(f"| {table.at[i, 'bench']} | {table.at[i, 'model']} | {table.at[i, 'config']} | "
                     f"{_fmt(table.at[i, 'image_size'], 'd') if table.at[i, 'image_size'] is not None else '-'} | "
                     f"{table.at[i, 'batch_size']} | " + " | ".join(cell(table, i, m) for m in present) + " |")
    path.write_text("\n".join(lines) + "\n")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def plot_models(out: Path, table: pd.DataFrame, machines: list[str], reference: str, metric: str) -> list[Path]:
    """One PNG per model: grouped bars (one per machine) per configuration, normalised to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in machines if m in table.columns]
    paths = []
    for model, part in table.groupby("model", sort=False):
        part = part.reset_index(drop=True)
        labels = [f"{r.config}\n{'' if r.image_size is None else f'{r.image_size}px '}b{r.batch_size}"
                  + ("\n(e2e)" if r.bench == "end_to_end" else "") for r in part.itertuples()]
        n, k = len(part), max(len(present), 1)
        width = 0.8 / k
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n * max(1, k / 2) + 2), 4.5))
        for j, m in enumerate(present):
            vals = part[f"{m} / ref"].to_numpy(dtype=float)
            xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
            bars = ax.bar(xs, vals, width, label=m[:60])
            for b, v in zip(bars, vals):
                if math.isfinite(v):
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(n))
        ax.set_xticklabels(labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=7)
        ax.set_ylabel(f"{metric} relative to reference")
        ax.set_title(f"{model}: {metric}, reference = {reference[:60]}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{_safe(str(model))}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def machine_details(files: list[str]) -> dict[str, str]:
    """CPU / RAM / GPU summary of each machine from the first fingerprint seen."""
    details: dict[str, str] = {}
    names = file_machines(files)
    for f in files:
        for r in common.read_jsonl(f):
            fp = r.get("fingerprint")
            m = names[(f, machine_key(r))]
            if m in details or not isinstance(fp, dict):
                continue
            cores = common.cpu_cores(fp)
            bits = [f"CPU {common.cpu_model(fp, local=False)}" + (f", {cores} cores" if cores else "")]
            ram = fp.get("ram_gb") or fp.get("memory_gb")
            if ram:
                bits.append(f"RAM {ram} GB")
            gpus = common.gpu_names(fp)
            if gpus:
                gpu = f"{len(gpus)}x {gpus[0]}"
                extra = [f"{fp['gpu_memory_gb']} GB" if fp.get("gpu_memory_gb") else None,
                         f"driver {fp['gpu_driver']}" if fp.get("gpu_driver") else None,
                         f"CUDA {fp['cuda_version']}" if fp.get("cuda_version") else None,
                         f"cc {fp['gpu_compute_capability']}" if fp.get("gpu_compute_capability") else None]
                extra = [e for e in extra if e]
                bits.append(gpu + (f" ({', '.join(extra)})" if extra else ""))
            else:
                bits.append("no GPU")
            versions = [f"{k} {fp[k]}" for k in ("torch", "dali", "timm") if fp.get(k)]
            if versions:
                bits.append(" ".join(versions))
            details[m] = "; ".join(bits)
    return details


def summary_ratios(table: pd.DataFrame, machines: list[str]) -> dict[str, float]:
    """Geometric mean over all cases of each machine's ratio to the reference (cases both measured)."""
    out = {}
    for m in machines:
        col = f"{m} / ref"
        if col in table.columns:
            out[m] = common.geomean([float(v) for v in table[col] if isinstance(v, float) and math.isfinite(v)])
    return out


def compare(files: list[str], reference: str | None = None, out: str | Path = "bench-compare",
            metric: str = "images_per_s", labels: dict[str, str] | None = None, plots: bool = True) -> dict[str, Any]:
    """Merge ``files``; write CSV, Markdown and charts into ``out``; return the table and the paths written."""
    frame, machines, files_of = load_rows(files, labels or {}, metric)
    ref = pick_reference(reference, machines, files_of)
    table = pivot(frame, machines, ref)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "comparison.csv", out / "comparison.md"
    table.to_csv(csv_path, index=False, float_format="%.4g")
    details = {} if labels else machine_details(files)
    overall = summary_ratios(table, machines)
    write_markdown(md_path, table, machines, ref, metric, details, overall)
    pngs = plot_models(out, table, machines, ref, metric) if plots and len(table) else []
    present = [m for m in machines if m in table.columns]
    common.print_table(f"{metric} by machine (ratio to {ref})", ["bench", "model", "mode / backend", "size", "batch"]
                       + present, [[table.at[i, "bench"], table.at[i, "model"], table.at[i, "config"],
                                    table.at[i, "image_size"], table.at[i, "batch_size"]]
                                   + [cell(table, i, m) for m in present] for i in range(len(table))])
    for m, geo in overall.items():
        if math.isfinite(geo):
            print(f"{m}: {geo:.2f}x the reference (geometric mean over the cases both measured)")
    for p in (csv_path, md_path, *pngs):
        print(f"wrote {p}")
    return {"table": table, "machines": machines, "reference": ref, "csv": csv_path, "markdown": md_path,
            "plots": pngs, "overall": overall}


def run(argv: list[str] | None = None) -> int:
    """The script's body: 0 when the merged table has a line, else 1."""
    args = parse_args(argv)
    labels = {}
    for item in args.label:
        if "=" not in item:
            raise common.BenchmarkError(f"--label {item!r}: expected FILE=NAME")
        f, name = item.split("=", 1)
        labels[f] = name
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise common.BenchmarkError(f"result file(s) not found: {', '.join(missing)}")
    res = compare(args.files, args.reference, args.out, args.metric, labels, plots=not args.no_plots)
    return 0 if len(res["table"]) else 1


def main(argv: list[str] | None = None) -> int:
    return common.run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The report card of a run: every stage, benchmark and tool-use evaluation appends its facts to <out_dir>/report.json,
and <out_dir>/report.md and <image_dir>/report.png are redrawn from it (the latest entry per stage / task wins).

    entry kinds   "stage"      data file and rows, steps, tokens, wall time, tokens/s, final training loss,
                               held-out loss and bits per byte (trainer/engine.py writes it at the end of fit)
                  "benchmark"  task -> score (scripts/eval_bench.py)
                  "metric"     a named score, e.g. tool-use accuracy (scripts/eval_tools.py) or the demo's held-out
                               metrics (demo/run.py)
"""

import json
import os
import time
from pathlib import Path

from .tracking import save_figure


def _write(path: Path, text: str):
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a crash mid-write leaves the previous report whole


def load(out_dir) -> list:
    path = Path(out_dir) / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def append(out_dir, entry: dict, image_dir=None) -> list:
    """Add one entry (stamped with the time), rewrite report.json / report.md, and redraw report.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = load(out_dir) + [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), **entry}]
    _write(out_dir / "report.json", json.dumps(entries, ensure_ascii=False, indent=1))
    _write(out_dir / "report.md", markdown(entries))
    if image_dir is not None:
        plot(entries, Path(image_dir) / "report.png")
    return entries


def latest(entries: list) -> tuple:
    """({stage: entry}, {task or metric name: (score, entry)}) keeping the newest of each, in first-seen order."""
    stages, scores = {}, {}
    for e in entries:
        if e["kind"] == "stage":
            stages[e["stage"]] = e
        elif e["kind"] == "benchmark":
            for task, value in e["scores"].items():
                scores[task] = (value, e)
        elif e["kind"] == "metric":
            scores[e["name"]] = (e["value"], e)
    return stages, scores


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def markdown(entries: list) -> str:
    stages, scores = latest(entries)
    lines = ["# Report card", ""]
    if stages:
        lines += ["| stage | data | rows | steps | tokens | wall time | tokens/s | train loss | held-out loss | "
                  "bits per byte |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, e in stages.items():
            tokens = _fmt(e.get("tokens"), ",")  # without padding; the padded count beside it where they differ
            if e.get("padded_tokens") and e["padded_tokens"] != e.get("tokens"):
                tokens += f" ({e['padded_tokens']:,} padded)"
            lines.append(f"| {name} | {Path(e['data']).name} | {e['rows']:,} | {e['steps']:,} | {tokens} | "
                         f"{e['seconds'] / 60:.1f} min | {_fmt(e.get('tokens_per_s'), ',.0f')} | "
                         f"{_fmt(e.get('train_loss'), '.4f')} | {_fmt(e.get('eval_loss'), '.4f')} | "
                         f"{_fmt(e.get('eval_bpb'), '.4f')} |")
        lines.append("")
    if scores:
        lines += ["| score | value | model | where from |", "| --- | --- | --- | --- |"]
        for name, (value, e) in scores.items():
            lines.append(f"| {name} | {value:.4f} | {e.get('model', '')} | {e.get('source', e['kind'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(entries: list, path: Path):
    """Two panels readable at a glance: held-out bits per byte (or loss) per stage, and every score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, scores = latest(entries)
    held = {k: e.get("eval_bpb") or e.get("eval_loss") for k, e in stages.items()
            if e.get("eval_bpb") is not None or e.get("eval_loss") is not None}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, gridspec_kw={"width_ratios": [1, 1.4]})
    ax = axes[0]
    if held:
        bars = ax.bar(list(held), list(held.values()), color="tab:blue")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_ylabel("held-out bits per byte (loss where no bpb)")
    else:
        ax.text(0.5, 0.5, "no held-out evaluation\n(--eval_data / --eval_split)", ha="center", va="center")
    ax.set_title("held-out, lower is better")
    ax = axes[1]
    if scores:
        names = list(scores)
        bars = ax.barh(names, [v for v, _ in scores.values()], color="tab:green")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.invert_yaxis()
        values = [v for v, _ in scores.values()]
        ax.set_xlim(min(0.0, min(values) * 1.15), max(1.0, max(values) * 1.15))
    else:
        ax.text(0.5, 0.5, "no scores yet\n(scripts/eval_bench.py, scripts/eval_tools.py)", ha="center", va="center")
    ax.set_title("scores, higher is better")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y" if ax is axes[0] else "x")
    save_figure(fig, path)

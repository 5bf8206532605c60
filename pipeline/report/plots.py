"""The report's plots (matplotlib, Agg, PNG bytes): training curves on common axes, sweep metrics per value."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Optional, Sequence

# One colour per training run in the loss plot, in plan order (teach, distill, baseline).
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
STYLES = {"loss": "-", "recon_loss": "--", "kd_loss": ":"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def read_metrics(path: Path) -> list[dict]:
    """The lines of a trainer's metrics.jsonl that have a step (a torn last line of a killed run is skipped)."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "step" in r:
            rows.append(r)
    return rows


def loss_curves(series: Sequence[tuple[str, list[dict]]]) -> Optional[bytes]:
    """Every run's total loss (solid), reconstruction (dashed) and distillation (dotted) loss against the step,
    on one pair of axes (log y). ``series``: (label, metrics lines). None when nothing was logged."""
    series = [(label, rows) for label, rows in series if rows]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.2), dpi=100)
    for i, (label, rows) in enumerate(series):
        for key, style in STYLES.items():
            if key != "loss" and all(r.get(key) == r.get("loss") for r in rows if key in r):
                continue  # recon_loss == loss when there is nothing else (teacher, gamma = 0): one line is enough
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts), style, color=COLOURS[i % len(COLOURS)], label=f"{label}: {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over each logging interval)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _png(fig)


def metric_vs_value(title: str, ylabel: str, labels: Sequence[str], per_seed: Sequence[Sequence[Optional[float]]],
                    xlabel: str) -> Optional[bytes]:
    """One metric of a sweep against the varied value: each seed's run as a point, mean ± sd as a bar.

    ``labels``: the grid points (numeric axes are spaced by value); ``per_seed``: for each point, the metric of
    each seed's run (None where that run is not finished). None when no run has the metric."""
    import numpy as np

    if not any(v is not None for vs in per_seed for v in vs):
        return None
    try:
        xs = [float(x) for x in labels]
        numeric = len(set(xs)) == len(xs)
    except ValueError:
        numeric = False
    if not numeric:
        xs = list(range(len(labels)))
    span = (max(xs) - min(xs)) if len(xs) > 1 else 1.0
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.3), dpi=100)
    labelled = False
    for x, vs in zip(xs, per_seed):
        ys = [v for v in vs if v is not None and math.isfinite(v)]
        if not ys:
            continue
        jitter = np.linspace(-0.015, 0.015, len(ys)) * span if len(ys) > 1 else [0.0]
        ax.plot([x + j for j in jitter], ys, "o", color="#1f77b4", alpha=0.55, markersize=5,
                label=None if labelled else "one seed's run")
        sd = float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0
        ax.errorbar([x], [float(np.mean(ys))], yerr=[sd], fmt="_", color="#d62728", markersize=18, capsize=4, lw=1.5,
                    label=None if labelled else "mean ± sd")
        labelled = True
    # every grid value on the axis, finished or not
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20 if max(len(s) for s in labels) > 6 else 0, fontsize=8)
    pad = 0.1 * span if len(xs) > 1 else 0.5
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)

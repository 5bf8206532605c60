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



def _x_positions(labels) -> tuple[list[float], bool]:
    """Where a plot puts its grid points: at their values when every label is a distinct number (numeric), else at
    0, 1, 2, ... in grid order."""
    try:
        xs = [float(x) for x in labels]
        if len(set(xs)) == len(xs):
            return xs, True
    except ValueError:
        pass
    return [float(i) for i in range(len(labels))], False

def metric_vs_value(title: str, ylabel: str, labels: Sequence[str], per_seed: Sequence[Sequence[Optional[float]]],
                    xlabel: str) -> Optional[bytes]:
    """One metric of a sweep against the varied value: each seed's run as a point, mean ± sd as a bar.

    ``labels``: the grid points (numeric axes are spaced by value); ``per_seed``: for each point, the metric of
    each seed's run (None where that run is not finished). None when no run has the metric."""
    import numpy as np

    if not any(v is not None for vs in per_seed for v in vs):
        return None
    xs, _ = _x_positions(labels)
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


# The models a study plot draws, in legend order: (metric key of pipeline.sweep, label, colour).
STUDY_MODELS = (("student_value", "student (RGB, distilled)", "#d62728"),
                ("baseline_value", "baseline (RGB, gamma 0)", "#2ca02c"),
                ("teacher_value", "teacher (depth)", "#1f77b4"))


def _study_axis(xs: list[float], numeric: bool) -> tuple[list[float], bool]:
    """Log or linear x for a study plot: log when the values are numbers whose positive part spans more than 30x.
    A single 0 among them (gamma 0, no noise) cannot sit on a log axis: it is drawn one decade below the smallest
    positive value, its tick still labelled 0, so that 0.01 and 0.1 are not squeezed against it."""
    pos = [x for x in xs if x > 0]
    if not numeric or len(pos) < 2 or max(pos) / min(pos) <= 30:
        return xs, False
    zeros = [x for x in xs if x == 0]
    if len(pos) + len(zeros) != len(xs) or len(zeros) > 1:
        return xs, False
    return [x if x > 0 else min(pos) / 10 for x in xs], True


def study_plot(title: str, ylabel: str, labels: Sequence[str], models: Sequence[tuple[str, str, Sequence[Sequence]]],
               floor: Sequence[Optional[float]], xlabel: str, marks: Sequence[str] = (),
               lower_better: bool = True) -> Optional[bytes]:
    """A study at a glance: each model's metric against the varied value, one line per model through the means
    (error bars: sd over seeds, faint points: each seed), the floor drawn as a dashed line.

    ``labels``: the varied values in grid order (numbers are spaced by value, on a log axis when they span more
    than 30x and are all positive); ``models``: (label, colour, per point the values of each seed's run, None
    where unfinished); ``floor``: the floor at each point; ``marks``: values to mark with a dotted vertical line
    (e.g. the paper's gamma 0.1 and 0.4). None when no model has a value."""
    import numpy as np

    if not any(v is not None for _, _, pts in models for vs in pts for v in vs):
        return None
    xs, numeric = _x_positions(labels)
    xs, log_x = _study_axis(xs, numeric)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=100)
    for label, colour, pts in models:
        mx, my, sd = [], [], []
        for x, vs in zip(xs, pts):
            ys = [float(v) for v in vs if v is not None and math.isfinite(float(v))]
            if not ys:
                continue
            ax.plot([x] * len(ys), ys, "o", color=colour, alpha=0.25, markersize=4)
            mx.append(x)
            my.append(float(np.mean(ys)))
            sd.append(float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0)
        if mx:
            ax.errorbar(mx, my, yerr=sd, fmt="-o", color=colour, capsize=3, lw=1.6, markersize=5, label=label)
    fl = [(x, f) for x, f in zip(xs, floor) if f is not None]
    if fl:
        if len({round(f, 6) for _, f in fl}) == 1:
            ax.axhline(fl[0][1], color="#555555", ls="--", lw=1.2, label="floor (mean pose)")
        else:
            ax.plot(*zip(*fl), "--", color="#555555", lw=1.2, marker="_", markersize=12, label="floor (mean pose)")
    for m in marks:
        if m in labels:
            mxv = xs[list(labels).index(m)]
        elif numeric:
            try:
                mxv = float(m)
            except ValueError:
                continue
        else:
            continue
        ax.axvline(mxv, color="#9467bd", ls=":", lw=1.2)
        ax.annotate(f"paper {m}", (mxv, 0.02), xycoords=("data", "axes fraction"), fontsize=7, color="#9467bd",
                    rotation=90, va="bottom", ha="right")
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20 if max(len(s) for s in labels) > 6 else 0, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (lower is better)" if lower_better else " (higher is better)"), fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)

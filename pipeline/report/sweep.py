"""One HTML page for a sweep (`report CONFIG --sweep KEY=A,B --seeds ...`, or `sweep ... --report FILE`).

Read from the store, like the experiment page: every run of the grid that is finished contributes, the others
show as missing. The page has the study plot (each model's metric against the varied value, one line per model,
the floor drawn; one plot per value of the other axes), the sweep's table (mean ± sd over seeds, the numbers of
:func:`pipeline.sweep.summarise`, the threads each model trained with), the re-runs' spread when the sweep has
re-runs, one plot of each metric against the varied value with every seed's run as a point, and a link to each
run's own page (written beside it, in ``<page>.runs/``).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Optional

from pipeline.store.artifacts import Store
from pipeline.store.io import write_atomic
from pipeline.report import plots
from pipeline.report.experiment import default_path, experiment_plan, write_experiment_report
from pipeline.report.html import esc, figure, fmt, link, page, state_badge, table
from pipeline.sweep import (METRICS, RERUN_COLUMNS, Axis, mean_sd_text, metric_row, resolve_runs, summarise,
                            training_threads)

LABELS = {"floor_value": "floor (mean pose)", "baseline_value": "baseline (RGB, gamma 0)", "student_value": "student",
          "teacher_value": "teacher (depth)", "baseline_mass_ratio": "baseline: mass on figure",
          "student_mass_ratio": "student: mass on figure", "teacher_mass_ratio": "teacher: mass on figure"}


# Values a study marks on its plot, by the varied key: the paper's own settings (Distill-DKP used gamma 0.1 and 0.4).
PAPER_VALUES = {"distill.gamma": ("0.1", "0.4")}


def sweep_default_path(store: Store, name: str) -> Path:
    return default_path(store, f"{name}-sweep")


def write_sweep_report(config: str, overrides: tuple[str, ...], axes: list[Axis], seeds: Optional[tuple[int, ...]],
                       store_dir: Optional[str], out: Optional[str] = None, reruns: int = 0) -> Path:
    """Write the sweep's page and every run's page; return the sweep page's path."""
    store = Store.from_option(store_dir)
    base, runs, cfgs = resolve_runs(config, tuple(overrides), axes, seeds, reruns)
    path = Path(out) if out else sweep_default_path(store, base.name)
    runs_dir = path.with_name(path.stem + ".runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows, listing = [], []
    for r, cfg in zip(runs, cfgs):
        plan = experiment_plan(cfg, store)
        run_page = write_experiment_report(cfg, store_dir, str(runs_dir / f"{r.name}.html"), source=config,
                                           overrides=tuple(overrides) + r.overrides, plan=plan)
        ev = plan.stages["eval"] if plan is not None else None
        state = ev.state if ev is not None else "missing"
        metrics = None
        if state == "fresh":
            try:
                metrics = json.loads((store.path("eval", ev.key) / "metrics.json").read_text())
            except (OSError, ValueError):
                state = "missing"
        row = {"name": r.name, "point": list(r.point), "seed": r.seed, "rerun": r.rerun, "state": state,
               "page": run_page}
        if metrics is not None:
            row |= metric_row(metrics) | {"threads": training_threads(store, metrics)}
            rows.append(row)
        listing.append(row)
    text = render(base.name, config, tuple(overrides), axes, seeds, rows, listing, store, path.parent, reruns)
    write_atomic(path, text, what="the sweep's HTML report")
    return path


def _point_label(point: list[str]) -> str:
    return " / ".join(point) if point else "(the config)"


def _run_label(r: dict) -> str:
    seed = f"seed {r['seed']}" if r["seed"] is not None else r["name"]
    return seed + (f" re-run {r['rerun']}" if r.get("rerun") else "")


def study_figures(axes: list[Axis], points: list[tuple], by_point: dict, unit: str, lower_better: bool) -> list[str]:
    """The study plots: each model's value against the last axis's values, one plot per combination of the other
    axes' values, the floor drawn (first runs of each seed; re-runs are in their own table)."""
    if not axes:
        return []
    last = axes[-1]
    groups: dict[tuple, list[tuple]] = {}
    for p in points:
        groups.setdefault(tuple(p[:-1]), []).append(p)
    figs = []
    for rest, pts in groups.items():
        def values(metric, p):
            return [r.get(metric) for r in by_point[p] if r["state"] == "fresh" and not r.get("rerun")]

        models = [(label, colour, [values(metric, p) for p in pts]) for metric, label, colour in plots.STUDY_MODELS]
        floors = []
        for p in pts:
            fl = [v for v in values("floor_value", p) if v is not None]
            floors.append(sum(fl) / len(fl) if fl else None)
        title = "study: " + last.label + (" at " + ", ".join(f"{a.label}={v}" for a, v in zip(axes[:-1], rest))
                                            if rest else "")
        png = plots.study_plot(title, unit, [p[-1] for p in pts], models, floors, last.label,
                               marks=PAPER_VALUES.get(last.label, ()), lower_better=lower_better)
        if png is not None:
            figs.append(figure(png, "", alt=title, plot=True))
    return figs


def _rerun_section(axes: list[Axis], summary: dict, points: list[tuple]) -> str:
    head = [ax.label for ax in axes] + ["seed", "runs"] + [f"{h}: mean ± sd (min–max)" for _, h in RERUN_COLUMNS[:4]]
    cells = []
    for p in points:
        rr = (summary.get(p) or {}).get("reruns")
        if not rr:
            continue
        row = [esc(v) for v in p] + [esc(rr["seed"]), str(rr["n"])]
        for k, _ in RERUN_COLUMNS[:4]:
            row.append("—" if rr[k] is None else esc(mean_sd_text(rr[k], rr[k + "_sd"], 3)
                                                       + f" ({rr[k + '_min']:.3f}–{rr[k + '_max']:.3f})"))
        cells.append(row)
    if not cells:
        return ""
    return ("<p>The same configuration and seed trained again (<code>teach.rerun</code>/<code>distill.rerun</code>: "
            "new keys, nothing else changed): the spread a user re-running one key sees, beside the spread over "
            "seeds above. With <code>deterministic: true</code> it is zero.</p>"
            + table(head, cells, num_cols=range(len(axes) + 1, len(head)), attrs='id="rerun-table"'))


def render(name: str, config: str, overrides: tuple[str, ...], axes: list[Axis], seeds, rows: list[dict],
           listing: list[dict], store: Store, out_dir: Path, reruns: int = 0) -> str:
    summary = {tuple(s["point"]): s for s in summarise(rows)}
    points = list(dict.fromkeys(tuple(r["point"]) for r in listing))  # grid order
    first = rows[0] if rows else {}
    unit = first.get("unit") or ""
    better = "higher" if first.get("higher_is_better") else "lower"
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    by_point: dict[tuple, list[dict]] = {}
    for r in listing:
        by_point.setdefault(tuple(r["point"]), []).append(r)

    # the table: one row per grid point, mean ± sd over the finished seeds, then each seed's run (linked)
    head = [ax.label for ax in axes] + ["runs done"] + [LABELS[m] for m in metrics] + ["threads (T/S/B)", "each run"]
    cells = []
    for p in points:
        s = summary.get(p)
        each = []
        for r in by_point[p]:
            value = fmt(r.get("student_value"), ".2f") if r["state"] == "fresh" else state_badge(r["state"])
            each.append(f"{link(r['page'], _run_label(r), out_dir)}: {value}")
        firsts = [r for r in by_point[p] if not r.get("rerun")]
        cells.append([esc(v) for v in p] + [f"{s['n'] if s else 0} / {len(firsts)}"]
                     + [esc(mean_sd_text(s[m], s[m + "_sd"])) if s else "—" for m in metrics]
                     + [esc(", ".join(s.get("threads") or ["?"])) if s else "—"] + ["<br>".join(each)])
    n_axes = len(axes)
    body = [f"<p>{len(listing)} runs ({len(points)} grid points × {len(seeds) if seeds else 1} seed(s)); "
            f"{len(rows)} finished. Values: {esc(first.get('protocol') or '?')} in {esc(unit)}, <b>{better} is "
            "better</b>; mean ± sample sd over the finished seeds (each seed's first run; no sd with one). Mass on "
            "figure: the heatmaps' share on figure pixels as a multiple of the figure's area. <i>threads</i>: the "
            "torch threads teacher / student / baseline trained with (<i>det</i>: deterministic; other thread "
            "counts give other bits). <i>each run</i>: the student's value, linked to that run's page.</p>",
            table(head, cells, num_cols=range(n_axes + 1, n_axes + 1 + len(metrics)), attrs='id="sweep-table"')]

    # one plot per metric against the varied value
    xlabel = " × ".join(ax.label for ax in axes) or "grid point"
    figs = []
    for m in metrics:
        per_seed = [[r.get(m) for r in by_point[p] if r["state"] == "fresh" and not r.get("rerun")] for p in points]
        png = plots.metric_vs_value(LABELS[m], unit if m.endswith("_value") else "× figure area",
                                    [_point_label(list(p)) for p in points], per_seed, xlabel)
        figs.append(figure(png, "", alt=LABELS[m], plot=True))  # the plot's title says what it is

    study = study_figures(axes, points, by_point, unit, better == "lower")
    rerun_html = _rerun_section(axes, summary, points)

    listing_rows = [[link(r["page"], r["name"], out_dir), esc(_point_label(r["point"])),
                     esc("" if r["seed"] is None else r["seed"]) + (f" (re-run {r['rerun']})" if r.get("rerun") else ""),
                     state_badge(r["state"]), fmt(r.get("student_value"), ".2f")] for r in listing]
    sets = " ".join(f"--set {o}" for o in overrides)
    cmd = (f"dkp-pipeline sweep {config} {sets} " + " ".join(f"--vary {ax.label}={','.join(ax.values)}" for ax in axes)
           + (f" --seeds {','.join(str(s) for s in seeds)}" if seeds else "") + (f" --reruns {reruns}" if reruns else ""))
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    sub = f"<code>{esc(' '.join(cmd.split()))}</code> · store <code>{esc(store.root)}</code> · {esc(when)}"
    sections = []
    if study:
        sections.append(("study", "The study: each model against " + esc(axes[-1].label) + " (floor dashed)",
                         "".join(study)))
    sections.append(("table", "Table", "\n".join(body)))
    if rerun_html:
        sections.append(("reruns", "Re-runs of one seed", rerun_html))
    return page(f"sweep {name}", sub, sections + [
        ("plots", "Metrics against the varied value", "".join(figs) or '<p class="note">no run is finished yet.</p>'),
        ("runs", "Runs", table(["run", "point", "seed", "eval", "student"], listing_rows, num_cols=(4,))),
    ])

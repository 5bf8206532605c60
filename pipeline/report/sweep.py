"""One HTML page for a sweep (`report CONFIG --sweep KEY=A,B --seeds ...`, or `sweep ... --report FILE`).

Read from the store, like the experiment page: every run of the grid that is finished contributes, the others
show as missing. The page has the sweep's table (mean ± sd over seeds, the numbers of :func:`pipeline.sweep.
summarise`), one plot of each metric against the varied value with every seed's run as a point, and a link to
each run's own page (written beside it, in ``<page>.runs/``).
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
from pipeline.sweep import METRICS, Axis, mean_sd_text, metric_row, resolve_runs, summarise

LABELS = {"floor_value": "floor (mean pose)", "baseline_value": "baseline (RGB, gamma 0)", "student_value": "student",
          "teacher_value": "teacher (depth)", "baseline_mass_ratio": "baseline: mass on figure",
          "student_mass_ratio": "student: mass on figure", "teacher_mass_ratio": "teacher: mass on figure"}


def sweep_default_path(store: Store, name: str) -> Path:
    return default_path(store, f"{name}-sweep")


def write_sweep_report(config: str, overrides: tuple[str, ...], axes: list[Axis], seeds: Optional[tuple[int, ...]],
                       store_dir: Optional[str], out: Optional[str] = None) -> Path:
    """Write the sweep's page and every run's page; return the sweep page's path."""
    store = Store.from_option(store_dir)
    base, runs, cfgs = resolve_runs(config, tuple(overrides), axes, seeds)
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
        row = {"name": r.name, "point": list(r.point), "seed": r.seed, "state": state, "page": run_page}
        if metrics is not None:
            row |= metric_row(metrics)
            rows.append(row)
        listing.append(row)
    text = render(base.name, config, tuple(overrides), axes, seeds, rows, listing, store, path.parent)
    write_atomic(path, text, what="the sweep's HTML report")
    return path


def _point_label(point: list[str]) -> str:
    return " / ".join(point) if point else "(the config)"


def render(name: str, config: str, overrides: tuple[str, ...], axes: list[Axis], seeds, rows: list[dict],
           listing: list[dict], store: Store, out_dir: Path) -> str:
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
    head = [ax.label for ax in axes] + ["runs done"] + [LABELS[m] for m in metrics] + ["each run"]
    cells = []
    for p in points:
        s = summary.get(p)
        each = []
        for r in by_point[p]:
            seed = f"seed {r['seed']}" if r["seed"] is not None else r["name"]
            value = fmt(r.get("student_value"), ".2f") if r["state"] == "fresh" else state_badge(r["state"])
            each.append(f"{link(r['page'], seed, out_dir)}: {value}")
        cells.append([esc(v) for v in p] + [f"{s['n'] if s else 0} / {len(by_point[p])}"]
                     + [esc(mean_sd_text(s[m], s[m + "_sd"])) if s else "—" for m in metrics] + ["<br>".join(each)])
    n_axes = len(axes)
    body = [f"<p>{len(listing)} runs ({len(points)} grid points × {len(seeds) if seeds else 1} seed(s)); "
            f"{len(rows)} finished. Values: {esc(first.get('protocol') or '?')} in {esc(unit)}, <b>{better} is "
            "better</b>; mean ± sample sd over the finished seeds (no sd with one). Mass on figure: the heatmaps' "
            "share on figure pixels as a multiple of the figure's area. <i>each run</i>: the student's value, "
            "linked to that run's page.</p>",
            table(head, cells, num_cols=range(n_axes + 1, n_axes + 1 + len(metrics)), attrs='id="sweep-table"')]

    # one plot per metric against the varied value
    xlabel = " × ".join(ax.label for ax in axes) or "grid point"
    figs = []
    for m in metrics:
        per_seed = [[r.get(m) for r in by_point[p] if r["state"] == "fresh"] for p in points]
        png = plots.metric_vs_value(LABELS[m], unit if m.endswith("_value") else "× figure area",
                                    [_point_label(list(p)) for p in points], per_seed, xlabel)
        figs.append(figure(png, "", alt=LABELS[m], plot=True))  # the plot's title says what it is

    listing_rows = [[link(r["page"], r["name"], out_dir), esc(_point_label(r["point"])),
                     esc("" if r["seed"] is None else r["seed"]), state_badge(r["state"]),
                     fmt(r.get("student_value"), ".2f")] for r in listing]
    sets = " ".join(f"--set {o}" for o in overrides)
    cmd = (f"dkp-pipeline sweep {config} {sets} " + " ".join(f"--vary {ax.label}={','.join(ax.values)}" for ax in axes)
           + (f" --seeds {','.join(str(s) for s in seeds)}" if seeds else ""))
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    sub = f"<code>{esc(' '.join(cmd.split()))}</code> · store <code>{esc(store.root)}</code> · {esc(when)}"
    return page(f"sweep {name}", sub, [
        ("table", "Table", "\n".join(body)),
        ("plots", "Metrics against the varied value", "".join(figs) or '<p class="note">no run is finished yet.</p>'),
        ("runs", "Runs", table(["run", "point", "seed", "eval", "student"], listing_rows, num_cols=(4,))),
    ])

"""`dkp-pipeline sweep`: one experiment over a grid of config values and seeds, eval's numbers in one table.

Each grid point and seed is an ordinary `run` (same store, same artifact keys), so a sweep reuses every
stage it shares with earlier runs (the depth cache, a teacher that only the student's settings vary
around), and a sweep that was interrupted or stopped by an error continues where it stopped when run again.

An axis is ``KEY[+KEY...]=V1,V2,...``: each value is set on every key joined by ``+`` (e.g.
``teach.recon_loss+distill.recon_loss=l1ssim,l1`` gives teacher and student the same loss), or, when every value
has one part per key joined by ``:``, each key its own part (``teach.model.width+distill.model.width=16:8,8:16``:
a wide teacher into a narrow student and the reverse, one axis of pairs). Seeds set
``teach.seed`` and ``distill.seed`` together. The table reports, per grid point, mean and sample standard
deviation over the seeds of the student's and teacher's protocol value and (synthetic data) their heatmap
mass on the figure as a multiple of the figure's area.

Re-runs (``--reruns N``): the first seed of every grid point is trained N more times with ``teach.rerun`` and
``distill.rerun`` = 1..N, which change nothing computed, only the keys, so each re-run really trains again. The
table then also reports the spread of those N + 1 runs of one seed beside the spread over seeds (which uses the
first run of each seed only): with ``deterministic: true`` the re-runs are bit-identical, without it they show
what the thread count's float reductions alone do to a result (docs/results.md, "Run-to-run spread"). Every
row also says how many threads each model trained with (from its artifact's record).
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import DkpError

SEED_KEYS = ("teach.seed", "distill.seed")
RERUN_KEYS = ("teach.rerun", "distill.rerun")


@dataclass(frozen=True)
class Axis:
    keys: tuple[str, ...]
    values: tuple[str, ...]

    @property
    def label(self) -> str:
        return "+".join(self.keys)

    @property
    def paired(self) -> bool:
        """True when each value gives each key its own part (``a:b`` for two keys)."""
        return len(self.keys) > 1 and all(v.count(":") == len(self.keys) - 1 for v in self.values)

    def assignments(self, value: str) -> tuple[tuple[str, str], ...]:
        """(key, value) of each key of the axis at ``value``."""
        parts = value.split(":") if self.paired else [value] * len(self.keys)
        return tuple(zip(self.keys, parts))


def parse_axis(spec: str) -> Axis:
    """``"teach.recon_loss+distill.recon_loss=l1ssim,l1"`` -> Axis; a clear DkpError otherwise."""
    if "=" not in spec:
        raise DkpError(f"bad --vary {spec!r}: expected KEY=V1,V2,... (join keys that take the same value with '+', "
                       "e.g. --vary teach.recon_loss+distill.recon_loss=l1ssim,l1)")
    left, right = spec.split("=", 1)
    keys = tuple(k.strip() for k in left.split("+"))
    if any(not k or any(not part.isidentifier() for part in k.split(".")) for k in keys):
        raise DkpError(f"bad --vary {spec!r}: keys must be dotted config names such as teach.lr, joined by '+'")
    values = tuple(v.strip() for v in right.split(","))
    if not values or any(v == "" for v in values):
        raise DkpError(f"bad --vary {spec!r}: give one or more comma-separated values, e.g. {left}=a,b")
    if len(set(values)) != len(values):
        raise DkpError(f"bad --vary {spec!r}: a value is repeated")
    return Axis(keys, values)


def parse_seeds(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"0,1,2"`` -> (0, 1, 2); None or empty -> None (the config's own seeds, one run per grid point)."""
    if text is None or not text.strip():
        return None
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise DkpError(f"bad --seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise DkpError(f"bad --seeds {text!r}: a seed is repeated")
    return seeds


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


@dataclass(frozen=True)
class SweepRun:
    point: tuple[str, ...]  # one value per axis
    seed: Optional[int]
    overrides: tuple[str, ...]  # the --set lines this run adds to the user's
    name: str
    rerun: int = 0  # 0: the seed's first run; 1..N: a re-run (--reruns) of the same configuration


def plan_runs(base_name: str, axes: list[Axis], seeds: Optional[tuple[int, ...]], reruns: int = 0) -> list[SweepRun]:
    """Every grid point (axes in the order given, last axis fastest) times every seed, then ``reruns`` re-runs of
    the point's first seed (``teach.rerun``/``distill.rerun`` = 1..reruns, names ending ``-r1``, ``-r2``...)."""
    if reruns < 0:
        raise DkpError(f"bad --reruns {reruns}: give 0 or more re-runs of the first seed")
    seen: dict[str, str] = {}
    for ax in axes:
        for k in ax.keys:
            if reruns and k in RERUN_KEYS:
                raise DkpError(f"--vary {ax.label}: {k} is set by --reruns; vary each key in one place")
            if k in seen or (seeds is not None and k in SEED_KEYS):
                other = seen.get(k, "--seeds")
                raise DkpError(f"--vary {ax.label}: {k} is already set by {other}; vary each key in one place")
            seen[k] = f"--vary {ax.label}"
    runs = []
    for point in itertools.product(*(ax.values for ax in axes)) if axes else [()]:
        sets = tuple(f"{k}={v}" for ax, value in zip(axes, point) for k, v in ax.assignments(value))
        tag = "-".join(slug(v) for v in point)
        for seed in (seeds if seeds is not None else (None,)):
            extra = sets + (tuple(f"{k}={seed}" for k in SEED_KEYS) if seed is not None else ())
            name = "-".join(p for p in (base_name, "sweep", tag, f"s{seed}" if seed is not None else "") if p)
            runs.append(SweepRun(tuple(point), seed, extra + (f"name={name}",), name))
        first = (seeds or (None,))[0]
        for r in range(1, reruns + 1):
            extra = sets + (tuple(f"{k}={first}" for k in SEED_KEYS) if first is not None else ()) \
                + tuple(f"{k}={r}" for k in RERUN_KEYS)
            name = "-".join(p for p in (base_name, "sweep", tag, f"s{first}" if first is not None else "", f"r{r}")
                            if p)
            runs.append(SweepRun(tuple(point), first, extra + (f"name={name}",), name, rerun=r))
    return runs


# (column key, header, function of metrics.json) of every number the sweep tabulates; a column that no run has
# (the baseline when eval.baseline is off) is left out of the table.
def _role_value(role: str, field: str):
    return lambda m: (m.get(role) or {}).get(field)


def _role_mass(role: str):
    return lambda m: ((m.get(role) or {}).get("figure_heatmap_mass") or {}).get("ratio")


METRIC_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("floor_value", "floor (mean pose)", _role_value("floor", "value")),
    ("baseline_value", "baseline (γ = 0)", _role_value("baseline", "value")),
    ("student_value", "student", _role_value("student", "value")),
    ("teacher_value", "teacher", _role_value("teacher", "value")),
    ("baseline_ratio_to_floor", "baseline × floor", _role_value("baseline", "ratio_to_floor")),
    ("student_ratio_to_floor", "student × floor", _role_value("student", "ratio_to_floor")),
    ("teacher_ratio_to_floor", "teacher × floor", _role_value("teacher", "ratio_to_floor")),
    ("student_ratio_to_baseline", "student × baseline", _role_value("student", "ratio_to_baseline")),
    ("student_mass_ratio", "student mass on figure (× area)", _role_mass("student")),
    ("teacher_mass_ratio", "teacher mass on figure (× area)", _role_mass("teacher")),
    ("baseline_mass_ratio", "baseline mass on figure (× area)", _role_mass("baseline")),
)
PER_SEED = ("student_value", "teacher_value")
# The per-run values the sweep report plots (the ratios are derived from them).
METRICS = tuple(k for k, _, _ in METRIC_COLUMNS if "_ratio_to_" not in k)


def metric_row(metrics: dict) -> dict:
    row: dict[str, Any] = {key: get(metrics) for key, _, get in METRIC_COLUMNS}
    row["unit"] = (metrics.get("student") or {}).get("unit")
    row["higher_is_better"] = (metrics.get("student") or {}).get("higher_is_better")
    row["protocol"] = metrics.get("protocol")
    return row


def _mean_sd(values: list) -> tuple[Optional[float], Optional[float]]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


# What the re-run spread is reported for: (key, header), the ratios being what the targets are stated in.
RERUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("student_ratio_to_floor", "student × floor"), ("student_ratio_to_baseline", "student × baseline"),
    ("teacher_ratio_to_floor", "teacher × floor"), ("baseline_ratio_to_floor", "baseline × floor"),
    ("student_value", "student"), ("teacher_value", "teacher"),
)


def summarise(rows: list[dict]) -> list[dict]:
    """Group finished runs by grid point: n, and mean/sd of each metric over the seeds (each seed's first run);
    with re-runs, ``reruns`` = the spread of the runs of the first seed (its first run and its re-runs):
    ``{"seed", "n", "<metric>", "<metric>_sd", "<metric>_min", "<metric>_max", "<metric>_each"}``; and
    ``threads``: the distinct "teacher/student/baseline" thread counts the runs trained with."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r["point"]), []).append(r)
    out = []
    for point, all_rs in groups.items():
        rs = [r for r in all_rs if not r.get("rerun")]
        s: dict[str, Any] = {"point": list(point), "n": len(rs), "seeds": [r["seed"] for r in rs]}
        for m, _, _ in METRIC_COLUMNS:
            s[m], s[m + "_sd"] = _mean_sd([r.get(m) for r in rs])
            s[m + "_each"] = [r.get(m) for r in rs]
        again = [r for r in all_rs if r.get("rerun")]
        if again:
            seed = again[0]["seed"]
            same = sorted((r for r in all_rs if r["seed"] == seed), key=lambda r: r.get("rerun") or 0)
            rr: dict[str, Any] = {"seed": seed, "n": len(same), "reruns": [r.get("rerun") or 0 for r in same]}
            for m, _ in RERUN_COLUMNS:
                vals = [r.get(m) for r in same]
                rr[m], rr[m + "_sd"] = _mean_sd(vals)
                finite = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
                rr[m + "_min"], rr[m + "_max"] = (min(finite), max(finite)) if finite else (None, None)
                rr[m + "_each"] = vals
            s["reruns"] = rr
        s["threads"] = sorted({r["threads"] for r in all_rs if r.get("threads")})
        out.append(s)
    return out


def training_threads(store, metrics: dict) -> Optional[str]:
    """"T/S/B": the threads the teacher, the student and the baseline of a finished run trained with, from their
    artifacts' records ("?" where a record predates the field, "-" for a model the run has not), "1/1/1 det" when
    all trained deterministic."""
    parts, det = [], []
    for role, stage in (("teacher", "teach"), ("student", "distill"), ("baseline", "distill")):
        key = (metrics.get(role) or {}).get("artifact")
        if not key:
            parts.append("-")
            continue
        try:
            res = json.loads((store.path(stage, key) / "artifact.json").read_text()).get("result") or {}
        except (OSError, ValueError):
            res = {}
        parts.append(str(res.get("threads", "?")))
        det.append(bool(res.get("deterministic")))
    if all(p == "-" for p in parts):
        return None
    return "/".join(parts) + (" det" if det and all(det) else "")


def mean_sd_text(mean: Optional[float], sd: Optional[float], digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def markdown_table(axes: list[Axis], summary: list[dict], protocol: str, unit: str, lower_better: bool) -> str:
    """The sweep's table (one row per grid point, mean ± sd over seeds), then, when the sweep has re-runs, the
    table of the re-runs' spread (one row per grid point)."""
    return _seed_table(axes, summary, protocol, unit, lower_better) + rerun_table(axes, summary)


def rerun_table(axes: list[Axis], summary: list[dict]) -> str:
    """Markdown: per grid point, the runs of one seed (first run + re-runs): mean ± sd, range and each value of
    the ratios; the thread counts. Empty when no point has re-runs."""
    have = [s for s in summary if s.get("reruns")]
    if not have:
        return ""
    head = [ax.label for ax in axes] + ["seed", "runs"] + [f"{h}: mean ± sd (min–max)" for _, h in RERUN_COLUMNS[:4]] \
        + ["student × floor, each run", "threads (T/S/B)"]
    lines = ["", "Re-runs of one seed (the same configuration trained again; the spread a user re-running a key "
                 "sees):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in have:
        rr = s["reruns"]
        cells = list(s["point"]) + [str(rr["seed"]), str(rr["n"])]
        for k, _ in RERUN_COLUMNS[:4]:
            if rr[k] is None:
                cells.append("—")
                continue
            cells.append(mean_sd_text(rr[k], rr[k + "_sd"], 3) + f" ({rr[k + '_min']:.3f}–{rr[k + '_max']:.3f})")
        cells.append(", ".join("—" if v is None else f"{v:.3f}" for v in rr["student_ratio_to_floor_each"]))
        cells.append(", ".join(s.get("threads") or ["?"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seed_table(axes: list[Axis], summary: list[dict], protocol: str, unit: str, lower_better: bool) -> str:
    direction = "lower" if lower_better else "higher"
    cols = [(k, h) for k, h, _ in METRIC_COLUMNS if any(s.get(k) is not None for s in summary)]
    head = ([ax.label for ax in axes] + ["runs"]
            + [f"{h} {protocol} ({unit}, {direction} is better)" if k == "student_value" else h for k, h in cols]
            + [f"{k.split('_')[0]} per seed" for k in PER_SEED])
    threads = any(s.get("threads") for s in summary)  # runs read from a store record their training threads
    if threads:
        head.append("threads (T/S/B)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        each = lambda k: ", ".join("—" if v is None else f"{v:.2f}" for v in s[k])  # noqa: E731
        digits = lambda k: 3 if "_ratio_to_" in k else 2  # noqa: E731
        cells = (list(s["point"]) + [str(s["n"])] + [mean_sd_text(s[k], s[k + "_sd"], digits(k)) for k, _ in cols]
                 + [each(k + "_each") for k in PER_SEED] + ([", ".join(s.get("threads") or ["?"])] if threads else []))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def resolve_runs(config: str, overrides: tuple[str, ...], axes: list[Axis], seeds: Optional[tuple[int, ...]],
                 reruns: int = 0):
    """(the base config, the runs, each run's config). Every configuration is resolved before anything runs: a bad
    value fails now, not an hour in."""
    from pipeline.config import load_config

    base = load_config(config, overrides)
    runs = plan_runs(base.name, axes, seeds, reruns)
    cfgs = []
    for r in runs:
        try:
            cfgs.append(load_config(config, tuple(overrides) + r.overrides))
        except DkpError as e:
            raise DkpError(f"sweep run {r.name}: {e}") from None
    return base, runs, cfgs


def run_sweep(config: str, overrides: tuple[str, ...], axes: list[Axis], seeds: Optional[tuple[int, ...]],
              store_dir: Optional[str], console, *, dry_run: bool = False, output: Optional[str] = None,
              jobs: Optional[int] = None, executor=None, reruns: int = 0) -> dict:
    """Run (or, with ``dry_run``, only list) every grid point and seed; return and optionally write the table.

    Stops at the first run that fails (its message says which run and how to continue); runs already
    finished are artifacts in the store, so the same command continues from there. With ``executor`` (a
    :class:`pipeline.cluster.JobOptions`) each run that is not fresh is a submitit job (Slurm, or local processes),
    and the table is gathered from the store when they have all ended."""
    from pipeline.store.artifacts import Store
    from pipeline.store.io import write_atomic, write_json_atomic
    from pipeline.runner import run_pipeline, synthetic_data_pending

    base, runs, cfgs = resolve_runs(config, overrides, axes, seeds, reruns)
    n_points = len(runs) // (len(seeds or (None,)) + reruns)
    console.print(f"sweep {base.name}: {len(runs)} runs ({n_points} grid points x {len(seeds) if seeds else 1} seeds"
                  + (f", + {reruns} re-run{'s' * (reruns > 1)} of the first seed" if reruns else "") + ")",
                  markup=False)
    store = Store.from_option(store_dir)
    if dry_run:
        from pipeline.graph import build_plan

        listed = []
        for r, cfg in zip(runs, cfgs):
            sets = " ".join(f"--set {o}" for o in r.overrides if not o.startswith("name="))
            if synthetic_data_pending(cfg):
                states = "synthetic data not generated yet"
            else:
                plan = build_plan(cfg, store, progress=False)
                states = ", ".join(f"{name} {s.state}" for name, s in plan.stages.items() if name != "manifest")
            console.print(f"  {r.name}: {sets or '(the config as it is)'}  [{states}]", markup=False, soft_wrap=True)
            listed.append(r.name)
        return {"runs": listed}

    if executor is not None:
        from pipeline.cluster import submit_sweep

        submit_sweep(config, overrides, runs, cfgs, store_dir, executor, console)
    rows = []
    for i, (r, cfg) in enumerate(zip(runs, cfgs), 1):
        if executor is not None:  # the jobs have ended: gather what they published
            from pipeline.graph import build_plan

            plan = build_plan(cfg, store, progress=False)
            if plan.stages["eval"].state != "fresh":
                raise DkpError(f"sweep run {r.name}: its job ended but eval is {plan.stages['eval'].state}; submit "
                               "the same sweep again to continue")
        else:
            console.print(f"[bold]sweep run {i}/{len(runs)}: {r.name}[/]", markup=True)
            try:
                plan = run_pipeline(cfg, store_dir, console=console, jobs=jobs)
            except DkpError as e:
                raise DkpError(f"sweep run {i}/{len(runs)} ({r.name}) failed: {e}\n{i - 1} runs are finished and "
                               "kept in the store; fix the cause and run the same sweep command again to continue") \
                    from None
        key = plan.stages["eval"].key
        metrics = json.loads((store.path("eval", key) / "metrics.json").read_text())
        rows.append({"name": r.name, "point": list(r.point), "seed": r.seed, "rerun": r.rerun, "eval_key": key,
                     "overrides": list(r.overrides), "threads": training_threads(store, metrics)}
                    | metric_row(metrics))
    summary = summarise(rows)
    first = rows[0]
    table = markdown_table(axes, summary, first["protocol"] or "?", first["unit"] or "",
                           lower_better=not first["higher_is_better"])
    result = {"config": config, "overrides": list(overrides), "axes": [{"keys": list(a.keys), "values": list(a.values)}
                                                                       for a in axes],
              "seeds": list(seeds) if seeds else None, "reruns": reruns, "runs": rows, "summary": summary,
              "table": table}
    console.print(table, markup=False, highlight=False, soft_wrap=True)
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, table)
        write_json_atomic(out.with_suffix(".json"), result)
        console.print(f"wrote {out} and {out.with_suffix('.json')}", markup=False)
    return result

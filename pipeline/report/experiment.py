"""One self-contained HTML page for an experiment, read from the store (nothing is run or changed).

Sections: the stages (fresh / stale and why / missing / in progress, key, wall and CPU time, device,
versions), the evaluation (eval's comparison table, then every number of metrics.json), the training
curves of teach and distill on common axes, the keypoint pictures (raw detections with the learned links,
and regressed keypoints against ground truth on test frames), the depth preview, and the provenance (the
resolved config against the preset it starts from, command lines, git SHAs, hosts). A stage that is not
built yet shows as missing in each section; the page never needs it.
"""
from __future__ import annotations

import datetime as _dt
import json
import shlex
from pathlib import Path
from typing import Any, Optional

from pipeline import config as C
from pipeline.store.artifacts import Store, git_sha
from pipeline.store.io import write_atomic
from pipeline.stages.changes import flatten
from pipeline.stages import registry
from pipeline.report import plots
from pipeline.report.html import esc, figure, fmt, gallery, link, page, read_png, state_badge, table

SECTIONS = (("stages", "Stages"), ("evaluation", "Evaluation"), ("curves", "Training curves"),
            ("pictures", "Keypoints"), ("depth", "Depth"), ("provenance", "Provenance"))
STAGE_HEAD = ("stage", "state", "why / progress", "key", "started", "wall s", "CPU s", "device", "versions")


def default_path(store: Store, name: str) -> Path:
    """Where `run` and `report` put an experiment's page: STORE/reports/<name>.html."""
    from pipeline.sweep import slug

    return store.root / "reports" / f"{slug(name)}.html"


def reference_config(source: Optional[str]) -> tuple[str, C.ExperimentConfig]:
    """What the experiment's config is compared with: the preset it is (or starts from with ``base:``), else the
    package defaults. Mirrors the layering of :func:`pipeline.config.load_config`."""
    import yaml

    if source is None:
        return "the package defaults", C.load_config(None)
    p = Path(source)
    if p.suffix in (".yaml", ".yml") or p.exists():
        base = (yaml.safe_load(p.read_text()) or {}).get("base")
        if base:
            return f"preset {base}", C.load_config(str(base))
        return "the package defaults", C.load_config(None)
    return f"preset {source}", C.load_config(source)


def config_diff(cfg: C.ExperimentConfig, reference: C.ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """(field, reference value, this value) for every field that differs."""
    a, b = flatten(C.to_dict(reference)), flatten(C.to_dict(cfg))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class ExperimentPage:
    """The page of one experiment: ``plan`` None means nothing can be planned yet (synthetic data not generated)."""

    def __init__(self, cfg: C.ExperimentConfig, store: Store, plan, *, out_dir: Path, source: Optional[str],
                 overrides: tuple[str, ...] = ()):
        self.cfg, self.store, self.plan, self.out_dir = cfg, store, plan, Path(out_dir)
        self.source, self.overrides = source, tuple(overrides)
        self.records = {name: (store.record(sp.stage, sp.key) if self.path(name).exists() else None)
                        for name, sp in self.entries()}

    # ---- the plan ----------------------------------------------------------------------------------------------
    def entries(self):
        return list(self.plan.stages.items()) if self.plan is not None else []

    def path(self, name: str) -> Path:
        sp = self.plan.stages[name]
        return self.store.path(sp.stage, sp.key)

    def state(self, name: str) -> str:
        return self.plan.stages[name].state if self.plan is not None and name in self.plan.stages else "missing"

    def entry_config(self, name: str) -> C.ExperimentConfig:
        sp = self.plan.stages[name]
        return sp.cfg or self.cfg

    def training_label(self, name: str) -> str:
        if self.plan.stages[name].stage == "distill":
            return f"{name} (gamma {self.entry_config(name).distill.gamma:g})"
        return name

    def not_built(self, name: str) -> str:
        st = self.state(name)
        sp = self.plan.stages.get(name) if self.plan is not None else None
        why = "; ".join(([sp.progress] if sp and sp.progress else []) + (sp.why if sp else []))
        return (f'<p class="note warn">{esc(registry.label(name))}: {state_badge(st)}'
                f"{' (' + esc(why) + ')' if why else ''}: build it with <code>dkp-pipeline run "
                f"{esc(self.source or self.cfg.name)}</code>.</p>")

    # ---- sections ----------------------------------------------------------------------------------------------
    def stages(self) -> str:
        if self.plan is None:
            rows = [[esc(s), state_badge("missing"), "the synthetic dataset is not generated yet", "", "", "", "", "",
                     ""] for s in registry.stage_names()]
            return (table(STAGE_HEAD, rows, attrs='id="stage-table"')
                    + f'<p class="note">No plan yet: <code>dkp-pipeline run {esc(self.source or self.cfg.name)}'
                      f"</code> generates the data ({esc(self.cfg.data.root)}) and builds every stage.</p>")
        version_sets: list[dict] = []
        rows = []
        for name, sp in self.entries():
            rec = self.records[name] or {}
            done = sp.state == "fresh"
            t = rec.get("timings", {})
            vs = rec.get("versions")
            if vs and vs not in version_sets:
                version_sets.append(vs)
            result = rec.get("result") or {}
            device = result.get("device") or ((rec.get("config") or {}).get("device") and
                                              f"{rec['config']['device']} (setting)")
            why = "; ".join(([sp.progress] if sp.progress else []) + sp.why)
            key = f"<code>{esc(sp.key[:16])}</code>"
            rows.append([esc(name if name == sp.stage else f"{name} ({sp.stage})"), state_badge(sp.state), esc(why),
                         link(self.path(name), sp.key[:16], self.out_dir) if self.path(name).exists() else key,
                         esc(t.get("first_started", "")), fmt(t.get("seconds_this_run") if done else None, ".1f"),
                         fmt(t.get("cpu_seconds_this_run") if done else None, ".1f"), esc(device or ""),
                         f"v{version_sets.index(vs) + 1}" if vs else ""])
        out = table(STAGE_HEAD, rows, num_cols=(5, 6), attrs='id="stage-table"')
        out += ('<p class="sub">wall and CPU time: of the process that finished the artifact (for a resumed stage, '
                "its last part); CPU includes finished DataLoader workers. Keys link to the artifact folders.</p>")
        if version_sets:
            names = sorted({k for vs in version_sets for k in vs})
            cells = [[f"v{i + 1}"] + [esc(vs.get(n) or "—") for n in names] for i, vs in enumerate(version_sets)]
            out += "<h3>versions</h3>" + table(["set"] + names, cells)
        return out

    def metrics(self) -> Optional[dict]:
        if self.state("eval") != "fresh":
            return None
        try:
            return json.loads((self.path("eval") / "metrics.json").read_text())
        except (OSError, ValueError):
            return None

    def evaluation(self) -> str:
        m = self.metrics()
        if m is None:
            return self.not_built("eval")
        from pipeline.stages.eval.run import comparison_rows  # imports torch: only when there is something to show

        rows = comparison_rows(m)
        if not rows:
            return '<p class="note warn">metrics.json holds no scored model.</p>'
        unit, better = rows[0]["unit"], "higher" if rows[0]["higher_is_better"] else "lower"
        body = [f"<p><b>{esc(m.get('protocol'))}</b> on <b>{esc(m.get('dataset'))}</b>: {esc(unit)}, "
                f"<b>{better} is better</b>. × floor: the value over the mean-pose floor's (predicting the fit "
                "split's mean pose for every test frame, no detector); a model that does not beat the floor learned "
                "nothing the regression can use.</p>"]
        cells = []
        for r in rows:
            role = m.get(r["role"], {})
            beats = r["beats_floor"]
            cells.append([esc(r["label"]), fmt(r["value"], ".2f"), fmt(r["ratio_to_floor"], ".3f"),
                          fmt(r["ratio_to_baseline"], ".3f"),
                          "" if beats is None else f'<span class="{"yes" if beats else "no"}">{fmt(beats)}</span>',
                          fmt(r["mass_ratio"], ".2f"), f"{role.get('n_fit', '—')} / {role.get('n_test', '—')}",
                          f"<code>{esc(str(role.get('artifact', ''))[:16])}</code>"])
        body.append(table(["model", f"value ({unit})", "× floor", "× baseline", "beats floor", "mass on figure",
                           "frames fit / test", "artifact"], cells, num_cols=(1, 2, 3, 5), attrs='id="comparison"'))
        if any(r["mass_ratio"] is not None for r in rows):
            body.append('<p class="sub">mass on figure: share of the heatmaps on figure pixels (up to 64 test frames), '
                        "as a multiple of the figure's area (1 = ignores the figure).</p>")
        if m.get("protocol_options"):
            body.append(f'<p class="sub">protocol options: <code>{esc(json.dumps(m["protocol_options"]))}</code></p>')
        leaves = flatten(m)
        body.append("<details><summary>every number in metrics.json</summary>"
                    + table(["field", "value"], [[f"<code>{esc(k)}</code>", f"<code>{esc(json.dumps(v))}</code>"]
                                                 for k, v in leaves.items()], attrs='id="metrics-json"')
                    + "</details>")
        return "\n".join(body)

    def training_entries(self) -> list[str]:
        return [n for n, sp in self.entries() if registry.stage(sp.stage).trains]

    def curves(self) -> str:
        if self.plan is None:
            return self.not_built("teach")
        series, notes = [], []
        for name in self.training_entries():
            rows = plots.read_metrics(self.path(name) / "metrics.jsonl")
            series.append((self.training_label(name), rows))
            if self.state(name) != "fresh":
                notes.append(self.not_built(name))
        png = plots.loss_curves(series)
        caption = ("the training loss of every run against the optimiser step, on common axes: total (solid), "
                   "reconstruction (dashed), distillation 1 − cos (dotted); runs still training show what they "
                   "logged so far")
        return (figure(png, caption, plot=True) if png else "") + "".join(notes)

    def pictures(self) -> str:
        if self.plan is None:
            return self.not_built("teach")
        out, raw = ["<h3>raw detections, with the learned links (white)</h3>"], []
        for name in self.training_entries():
            d = self.path(name)
            samples = sorted((d / "samples").glob("step_*.png")) if d.is_dir() else []
            final = d / "keypoints.png"
            shown = final if final.is_file() else (samples[-1] if samples else None)
            if shown is None:
                out.append(self.not_built(name))
                continue
            steps = ", ".join(link(s, s.stem.replace("step_", "").lstrip("0") or "0", self.out_dir) for s in samples)
            what = "depth" if self.plan.stages[name].stage == "teach" else "RGB"
            when = "end of training" if shown == final else esc(shown.stem)
            caption = (f"{esc(self.training_label(name))}: keypoints on the {what} of up to 16 test frames, {when}"
                       + (f"; every eval step: {steps}" if steps else ""))
            raw.append(figure(read_png(shown), caption, alt=f"{name} keypoints"))
        out.append(gallery(raw))
        out.append("<h3>regressed keypoints (colours) against ground truth (white crosses), test frames</h3>")
        m = self.metrics()
        if m is None:
            out.append(self.not_built("eval"))
        else:
            out.append(gallery(
                figure(read_png(self.path("eval") / f"{role}_test.png"),
                       f"{role}: the ground-truth joints regressed from its detections "
                       f"({fmt(m[role].get('value'), '.2f')} {esc(m[role].get('unit', ''))})",
                       alt=f"{role} test frames")
                for role in ("student", "baseline", "teacher") if role in m))
        return "\n".join(out)

    def depth(self) -> str:
        if self.plan is None or self.state("depth") != "fresh":
            return self.not_built("depth")
        from pipeline.stages.depth.stage import PREVIEW

        rec = self.records.get("depth") or {}
        spec = rec.get("cache_spec") or {}
        caption = (f"frames spread over the manifest, each as RGB and its inverse depth (inferno, bright = near; "
                   f"min-max per frame); provider {esc(spec.get('provider', self.cfg.depth.provider))}, "
                   f"{esc(rec.get('n_valid', '?'))}/{esc(rec.get('n_frames', '?'))} frames valid")
        return figure(read_png(self.path("depth") / PREVIEW), caption)

    def provenance(self) -> str:
        label, ref = reference_config(self.source)
        diff = config_diff(self.cfg, ref)
        out = [f"<h3>resolved config against {esc(label)}</h3>"]
        if self.overrides:
            out.append(f"<p>overrides: <code>{esc(' '.join('--set ' + o for o in self.overrides))}</code></p>")
        out.append(table(["field", esc(label), "this experiment"],
                         [[f"<code>{esc(k)}</code>", f"<code>{esc(json.dumps(a))}</code>",
                           f"<code>{esc(json.dumps(b))}</code>"] for k, a, b in diff], attrs='id="config-diff"')
                   if diff else f"<p>identical to {esc(label)}.</p>")
        commands: dict[str, list[str]] = {}
        shas: dict[str, list[str]] = {}
        hosts: dict[str, list[str]] = {}
        for name, rec in self.records.items():
            if not rec:
                continue
            cmd = rec.get("command")
            commands.setdefault(shlex.join(cmd) if isinstance(cmd, list) else str(cmd), []).append(name)
            shas.setdefault(str(rec.get("git_sha")), []).append(name)
            hosts.setdefault(str(rec.get("host")), []).append(name)
        for title, groups, code in (("command lines", commands, True), ("git SHA of the code that built each stage",
                                                                        shas, True), ("hosts", hosts, False)):
            out.append(f"<h3>{title}</h3>")
            out.append(table([title.split(" of ")[0].rstrip("s"), "stages"],
                             [[f"<code>{esc(k)}</code>" if code else esc(k), esc(", ".join(v))]
                              for k, v in groups.items()]) if groups else "<p>no stage built yet.</p>")
        out.append(f"<p>this page: git SHA <code>{esc(git_sha())}</code>.</p>")
        out.append("<details><summary>the resolved config (YAML)</summary><pre>" + esc(C.to_yaml(self.cfg))
                   + "</pre></details>")
        return "\n".join(out)

    def render(self) -> str:
        when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        sets = " ".join("--set " + o for o in self.overrides)
        sub = (f"config <code>{esc(self.source or 'the package defaults')}</code>"
               f"{' with <code>' + esc(sets) + '</code>' if sets else ''} · store <code>{esc(self.store.root)}</code>"
               f" · {esc(when)}")
        bodies = {"stages": self.stages, "evaluation": self.evaluation, "curves": self.curves,
                  "pictures": self.pictures, "depth": self.depth, "provenance": self.provenance}
        return page(f"experiment {self.cfg.name}", sub, [(a, t, bodies[a]()) for a, t in SECTIONS])


def experiment_plan(cfg: C.ExperimentConfig, store: Store, manifest=None):
    """The plan of ``cfg`` as `status` sees it, or None while the synthetic data it needs is not generated.
    ``manifest``: the dataset's manifest when the caller has just built it (`run`: not walked twice)."""
    from pipeline.graph import build_plan
    from pipeline.runner import synthetic_data_pending

    return None if synthetic_data_pending(cfg) else build_plan(cfg, store, progress=False, manifest=manifest)


def write_experiment_report(cfg: C.ExperimentConfig, store_dir: Optional[str], out: Optional[str] = None, *,
                            source: Optional[str], overrides: tuple[str, ...] = (), plan=None,
                            manifest=None) -> Path:
    """Write the page of ``cfg`` (default: STORE/reports/<name>.html) and return its path."""
    store = Store.from_option(store_dir)
    path = Path(out) if out else default_path(store, cfg.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = plan if plan is not None else experiment_plan(cfg, store, manifest)
    text = ExperimentPage(cfg, store, plan, out_dir=path.parent, source=source, overrides=overrides).render()
    write_atomic(path, text, what="the experiment's HTML report")
    return path

"""`eval`: score the student (RGB) and the teacher (depth) with the dataset's protocol.

Detections are made at the model resolution S on the same square resize/crop as training; ground truth
(original-frame pixels in the manifest) goes through the same transform, so both live in the S x S frame
the metric functions get (they rescale to the paper's reporting size where the protocol says so).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.store.io import write_json_atomic
from pipeline.data.datasets import FrameDataset
from pipeline.errors import DkpError
from pipeline.data.images import square_transform
from pipeline.stages import common


def gt_in_model_frame(manifest, indices, size: int) -> np.ndarray:
    """(N, J, 2) GT pixels (x, y) mapped into the S x S model frame (NaN stays NaN)."""
    out = np.array(manifest.keypoints[indices], dtype=np.float64)
    for r, i in enumerate(indices):
        w, h = (int(v) for v in manifest.sizes[i])
        sx, sy, ox, oy = square_transform(h, w, size)
        out[r, :, 0] = out[r, :, 0] * sx + ox
        out[r, :, 1] = out[r, :, 1] * sy + oy
    return out


def dataset_flip_pairs(manifest) -> list[tuple[int, int]]:
    """(left, right) GT joint pairs from ROOT/dataset.yaml: ``left_right_pairs`` (your own folder dataset) or
    ``synthetic.left_right_pairs`` (what `synth` writes), via :attr:`pipeline.data.manifest.Manifest.left_right_pairs`."""
    path = Path(manifest.root) / manifest.spec.files.get("options_file", "dataset.yaml")
    fix = (f"add 'left_right_pairs: [[left, right], ...]' (GT joint indices) to {path}, or set eval.flip_pairs: none "
           f"(the built-in synthetic data gets them from `dkp-pipeline synth`)")
    pairs = manifest.left_right_pairs
    if not pairs:
        raise DkpError(f"eval.flip_pairs=dataset: {path} gives no left/right joint pairs; {fix}")
    n_joints = manifest.keypoints.shape[1]
    out = []
    for p in pairs if isinstance(pairs, list) else [pairs]:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < n_joints for j in p)):
            raise DkpError(f"{path}: left_right_pairs entry {p!r} is not a pair of joint indices in "
                           f"[0, {n_joints - 1}]; {fix}")
        out.append((int(p[0]), int(p[1])))
    return out


def protocol_options(ctx, protocol: str) -> dict:
    """Keyword options for :func:`dkp_core.metrics.evaluate` from the eval config."""
    flip = ctx.settings.flip_pairs
    if flip == "none":
        return {}
    if protocol not in ("l2", "normalised_l2"):
        raise DkpError(f"eval.flip_pairs={flip} works with protocol l2 only (this dataset's protocol is {protocol}); "
                       "set eval.flip_pairs: none")
    return {"flip_pairs": dataset_flip_pairs(ctx.plan.manifest)}


@torch.no_grad()
def detect(model, ds: FrameDataset, key: str, device, batch: int = 64) -> np.ndarray:
    """(N, K, 2) detected keypoints in pixels (x, y) of the S x S model frame."""
    model = model.to(device).eval()
    S = ds.image_size
    out = []
    for s in range(0, len(ds), batch):
        x = torch.stack([ds[i][key] for i in range(s, min(s + batch, len(ds)))]).to(device)
        kp = model.detector(x).keypoints.float().cpu().numpy()
        out.append((kp + 1) / 2 * (S - 1))
    return np.concatenate(out) if out else np.zeros((0, model.detector.n_keypoints, 2))


ROLES = (("student", "distill", "rgb"), ("baseline", "baseline", "rgb"), ("teacher", "teach", "depth"))


def beats(value: float, reference: float, higher_is_better: bool) -> bool:
    return value > reference if higher_is_better else value < reference


def run(ctx) -> dict:
    from dkp_core.metrics import evaluate, mean_pose_floor
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.training import resolve_device
    from pipeline.viz import draw_keypoints, grid, save_png

    from pipeline.data.reads import eval_data_problem

    m = ctx.plan.manifest
    problem = eval_data_problem(m)
    if problem:
        raise DkpError(problem)
    settings = ctx.settings  # eval's section, protocol resolved (registry)
    protocol = settings.protocol
    device = resolve_device(settings.device)
    fit, test = m.split("regress"), m.split("test")
    options = protocol_options(ctx, protocol)
    from pipeline.data.degrade import teacher_reader

    # the teacher is scored on the depth it was trained on (depth.degrade; the cache's own maps by default)
    reader = teacher_reader(DepthCacheReader(ctx.upstream_path("depth")), ctx.cfg.depth.degrade)
    results, arrays = {}, {}
    roles = [r for r in ROLES if r[1] in ctx.plan.stages]
    for role, entry, key in roles:
        model, payload = common.load_trained(ctx.upstream_path(entry))
        S = model.detector.image_size if hasattr(model.detector, "image_size") else payload["model_args"]["image_size"]
        sets = {}
        for split, idx in (("fit", fit), ("test", test)):
            if key == "depth":
                ok = np.array([reader.is_valid(int(i)) for i in idx], dtype=bool)
                idx = idx[ok]
            ds = FrameDataset(manifest=m, indices=idx, image_size=S, use_rgb=key == "rgb", use_depth=key == "depth",
                              depth_reader=reader)
            sets[split] = (idx, detect(model, ds, key, device, settings.batch_size_inference),
                           gt_in_model_frame(m, idx, S))
        arrays_in = dict(det_fit=sets["fit"][1], gt_fit=sets["fit"][2], det_test=sets["test"][1],
                         gt_test=sets["test"][2], image_size=S)
        try:
            r = evaluate(protocol, **arrays_in, **options)
            # the floor on the same frames, in the same frame: the fit split's mean pose for every test frame
            floor = mean_pose_floor(protocol, gt_fit=arrays_in["gt_fit"], gt_test=arrays_in["gt_test"],
                                    image_size=S, **options)
            if options:
                # the same detections scored without the orientation matching, for comparison
                r.details["value_without_flip_pairs"] = float(evaluate(protocol, **arrays_in).value)
                floor.details["value_without_flip_pairs"] = float(
                    mean_pose_floor(protocol, gt_fit=arrays_in["gt_fit"], gt_test=arrays_in["gt_test"],
                                    image_size=S).value)
        except ValueError as e:  # the metric functions name the array and the expected shape
            raise DkpError(f"eval protocol {protocol} on dataset {m.name} ({role}, {entry} artifact): {e}") from None
        for split, (idx, det, gt) in sets.items():
            arrays[f"{role}_{split}_index"], arrays[f"{role}_{split}_det"] = idx, det
            arrays[f"{role}_{split}_gt"] = gt
        arrays[f"{role}_image_size"] = np.array(S)
        results[role] = r.to_dict() | {"input": key, "n_fit": int(len(sets["fit"][0])),
                                       "n_test": int(len(sets["test"][0])), "artifact": ctx.plan.stages[entry].key,
                                       "floor_value": float(floor.value),
                                       "ratio_to_floor": _ratio(r.value, floor.value),
                                       "beats_floor": beats(r.value, floor.value, r.higher_is_better)}
        if "floor" not in results:  # the student's frames (the first role): the row the table prints
            results["floor"] = (floor.to_dict() | {
                "what": "the fit split's mean pose predicted for every test frame (no detector), through the "
                        "same protocol", "n_fit": int(len(sets["fit"][0])), "n_test": int(len(sets["test"][0])),
                "image_size": int(S)})
        on_figure = common.figure_mass(model, m, sets["test"][0][:64], S, key, reader, device)
        if on_figure is not None:
            results[role]["figure_heatmap_mass"] = on_figure
        # picture: first 16 test frames, regressed keypoints (colours) and ground truth (white crosses)
        vis_ds = FrameDataset(manifest=m, indices=sets["test"][0][:16], image_size=S, use_rgb=True,
                              use_depth=key == "depth", depth_reader=reader)
        tiles = []
        for j in range(len(vis_ds)):
            bg = common.to_uint8(vis_ds[j][key])
            tiles.append(draw_keypoints(bg, r.pred_test[j], gt=r.gt_test[j], scale=max(1, 256 // S)))
        if tiles:
            save_png(ctx.path / f"{role}_test.png", grid(tiles, cols=8))
    if "baseline" in results:
        results["student"]["ratio_to_baseline"] = _ratio(results["student"]["value"], results["baseline"]["value"])
    summary = {"protocol": protocol, "dataset": m.name, "gamma": ctx.cfg.distill.gamma,
               "layer": ctx.cfg.distill.layer, "protocol_options": {k: [list(p) for p in v] for k, v in options.items()},
               **results}
    # The detections and GT every number was computed from (pixels (x, y) of each model's S x S frame), so a
    # number can be recomputed or re-scored with another protocol without running a model.
    _save_npz(ctx.path / "detections.npz", arrays)
    write_json_atomic(ctx.path / "metrics.json", summary)
    print_comparison(summary, ctx.console)
    return {"metrics": summary}


def _ratio(value: float, reference: float) -> float | None:
    return float(value / reference) if reference else None


def comparison_rows(summary: dict) -> list[dict]:
    """The rows eval prints and reports write: floor, baseline (when built), student, teacher."""
    rows = []
    labels = {"floor": "floor: mean pose", "baseline": "baseline: RGB, gamma 0",
              "student": f"student: RGB, gamma {summary.get('gamma')}", "teacher": "teacher: depth"}
    for role in ("floor", "baseline", "student", "teacher"):
        r = summary.get(role)
        if not r:
            continue
        fig = r.get("figure_heatmap_mass")
        rows.append({"role": role, "label": labels[role], "value": r["value"], "unit": r["unit"],
                     "higher_is_better": r["higher_is_better"],
                     "ratio_to_floor": 1.0 if role == "floor" else r.get("ratio_to_floor"),
                     "ratio_to_baseline": r.get("ratio_to_baseline"),
                     "beats_floor": None if role == "floor" else r.get("beats_floor"),
                     "mass_ratio": fig.get("ratio") if fig else None})
    return rows


def print_comparison(summary: dict, console) -> None:
    """One table, then one plain sentence for each model that does not beat the floor."""
    from rich.table import Table

    rows = comparison_rows(summary)
    if not rows:
        return
    unit, better = rows[0]["unit"], "higher" if rows[0]["higher_is_better"] else "lower"
    t = Table(title=f"eval: {summary['protocol']} on {summary['dataset']} ({unit}; {better} is better)",
              title_justify="left")
    for col in ("", "value", "× floor", "× baseline", "mass on figure"):
        t.add_column(col, justify="left" if not col else "right")

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in rows:
        t.add_row(r["label"], f(r["value"], ".2f"), f(r["ratio_to_floor"], ".3f"), f(r["ratio_to_baseline"], ".3f"),
                  f(r["mass_ratio"], ".2f"))
    console.print(t)
    if any(r["mass_ratio"] is not None for r in rows):
        console.print("mass on figure: share of the heatmaps on figure pixels (64 test frames), as a multiple of the "
                      "figure's area (1 = ignores the figure)", markup=False)
    floor = next((r for r in rows if r["role"] == "floor"), None)
    for r in rows:
        if r["role"] != "floor" and r["beats_floor"] is False and floor is not None:
            console.print(f"{r['label'].split(':')[0]} does NOT beat the floor: {r['value']:.2f} vs "
                          f"{floor['value']:.2f} for predicting the mean pose on every frame; it has learned nothing "
                          "the regression can use.", markup=False)


def _save_npz(path: Path, arrays: dict) -> None:
    import io

    from pipeline.store.io import write_atomic

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())

"""`eval`: score the student (RGB) and the teacher (depth) with the dataset's protocol.

Detections are made at the model resolution S on the same square resize/crop as training; ground truth
(original-frame pixels in the manifest) goes through the same transform, so both live in the S x S frame
the metric functions get (they rescale to the paper's reporting size where the protocol says so).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import write_json_atomic
from pipeline.datasets import FrameDataset
from pipeline.errors import DkpError
from pipeline.images import square_transform
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
    """(left, right) GT joint pairs from ROOT/dataset.yaml ``synthetic.left_right_pairs`` (what `synth` writes)."""
    import yaml

    path = Path(manifest.root) / "dataset.yaml"
    fix = "set eval.flip_pairs: none, or regenerate the data with `dkp-pipeline synth`"
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise DkpError(f"eval.flip_pairs=dataset: {path} not found, so there are no left/right pairs; {fix}") from None
    pairs = (doc.get("synthetic") or {}).get("left_right_pairs") if isinstance(doc, dict) else None
    if not pairs:
        raise DkpError(f"eval.flip_pairs=dataset: {path} has no synthetic.left_right_pairs; {fix}")
    n_joints = manifest.keypoints.shape[1]
    out = []
    for p in pairs:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(j, int) and 0 <= j < n_joints for j in p)):
            raise DkpError(f"{path}: synthetic.left_right_pairs entry {p!r} is not a pair of joint indices in "
                           f"[0, {n_joints - 1}]; {fix}")
        out.append((int(p[0]), int(p[1])))
    return out


def protocol_options(ctx, protocol: str) -> dict:
    """Keyword options for :func:`dkp_core.metrics.evaluate` from the eval config."""
    flip = ctx.stage.inputs["config"].get("flip_pairs", "none")
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


def figure_mass(model, manifest, indices, size: int, key: str, reader, device) -> dict | None:
    """Share of the detector's heatmap mass on the figure (pipeline.foreground), when masks are known.

    Independent of the regression: a detector whose keypoints ignore the figure has mass ~ the figure's area
    fraction. Returns {"mass_in_mask", "mask_area", "ratio", "n_frames"} or None (no masks for this dataset).
    """
    from pipeline.foreground import foreground_masks, heatmap_mass_in_mask

    if len(indices) == 0:
        return None
    masks = foreground_masks(manifest, indices, size)
    if masks is None:
        return None
    ds = FrameDataset(manifest=manifest, indices=indices, image_size=size, use_rgb=key == "rgb",
                      use_depth=key == "depth", depth_reader=reader)
    x = torch.stack([ds[i][key] for i in range(len(ds))]).to(device)
    with torch.no_grad():
        heat = model.to(device).eval().detector(x).heatmaps.float().cpu().numpy()  # (N, K, h, w)
    return heatmap_mass_in_mask(heat, masks) | {"n_frames": int(len(indices))}


def run(ctx) -> dict:
    from dkp_core.metrics import evaluate
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.train import resolve_device
    from pipeline.viz import draw_keypoints, grid, save_png

    from pipeline.reads import eval_data_problem

    m = ctx.plan.manifest
    problem = eval_data_problem(m)
    if problem:
        raise DkpError(problem)
    protocol = ctx.stage.inputs["config"]["protocol"]
    device = resolve_device(ctx.cfg.eval.device)
    fit, test = m.split("regress"), m.split("test")
    options = protocol_options(ctx, protocol)
    reader = DepthCacheReader(ctx.upstream_path("depth"))
    results, arrays = {}, {}
    for role, stage, key in (("student", "distill", "rgb"), ("teacher", "teach", "depth")):
        model, payload = common.load_trained(ctx.upstream_path(stage))
        S = model.detector.image_size if hasattr(model.detector, "image_size") else payload["model_args"]["image_size"]
        sets = {}
        for split, idx in (("fit", fit), ("test", test)):
            if key == "depth":
                ok = np.array([reader.is_valid(int(i)) for i in idx], dtype=bool)
                idx = idx[ok]
            ds = FrameDataset(manifest=m, indices=idx, image_size=S, use_rgb=key == "rgb", use_depth=key == "depth",
                              depth_reader=reader)
            sets[split] = (idx, detect(model, ds, key, device, ctx.cfg.eval.batch_size_inference),
                           gt_in_model_frame(m, idx, S))
        arrays_in = dict(det_fit=sets["fit"][1], gt_fit=sets["fit"][2], det_test=sets["test"][1],
                         gt_test=sets["test"][2], image_size=S)
        try:
            r = evaluate(protocol, **arrays_in, **options)
            if options:
                # the same detections scored without the orientation matching, for comparison
                r.details["value_without_flip_pairs"] = float(evaluate(protocol, **arrays_in).value)
        except ValueError as e:  # the metric functions name the array and the expected shape
            raise DkpError(f"eval protocol {protocol} on dataset {m.name} ({role}, {stage} artifact): {e}") from None
        for split, (idx, det, gt) in sets.items():
            arrays[f"{role}_{split}_index"], arrays[f"{role}_{split}_det"] = idx, det
            arrays[f"{role}_{split}_gt"] = gt
        arrays[f"{role}_image_size"] = np.array(S)
        results[role] = r.to_dict() | {"input": key, "n_fit": int(len(sets["fit"][0])),
                                       "n_test": int(len(sets["test"][0])), "artifact": ctx.plan.stages[stage].key}
        on_figure = figure_mass(model, m, sets["test"][0][:64], S, key, reader, device)
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
    summary = {"protocol": protocol, "dataset": m.name, "gamma": ctx.cfg.distill.gamma,
               "layer": ctx.cfg.distill.layer, "protocol_options": {k: [list(p) for p in v] for k, v in options.items()},
               **results}
    # The detections and GT every number was computed from (pixels (x, y) of each model's S x S frame), so a
    # number can be recomputed or re-scored with another protocol without running a model.
    _save_npz(ctx.path / "detections.npz", arrays)
    write_json_atomic(ctx.path / "metrics.json", summary)
    for role, r in results.items():
        fig = r.get("figure_heatmap_mass")
        ctx.console.print(f"{role:8s} ({r['input']}): {protocol} = {r['value']:.4f} {r['unit']} "
                          f"({'higher' if r['higher_is_better'] else 'lower'} is better)"
                          + (f"; heatmap mass on the figure {fig['mass_in_mask']:.3f} (area {fig['mask_area']:.3f})"
                             if fig else ""), markup=False)
    return {"metrics": summary}


def _save_npz(path: Path, arrays: dict) -> None:
    import io

    from pipeline.artifacts import write_atomic

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())

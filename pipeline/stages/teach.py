"""Stage 2 `teach`: the AutoLink teacher trained on the cached depth maps.

Input: per-frame min-max normalised inverse depth, replicated to 3 channels (docs/conventions.md);
the decoder reconstructs that depth image from its masked version and the learned link map.
"""
from __future__ import annotations

import torch

from pipeline.data.datasets import FrameDataset, collate_frames, valid_train_indices
from pipeline.stages import common


def open_depth(ctx):
    """The depth cache as the teacher reads it: degraded when ``depth.degrade`` is set (pipeline/data/degrade.py)."""
    from pipeline.data.degrade import teacher_reader
    from pipeline.depth_cache import DepthCacheReader

    return teacher_reader(DepthCacheReader(ctx.upstream_path("depth")), ctx.cfg.depth.degrade)


def fixed_batch(ds, n: int = 16) -> dict:
    """The first n items (no flip): the same frames in every picture of a run."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def figure_heatmap_mass(model, manifest, reader, indices, image_size: int, max_frames: int = 64):
    """Built-in synthetic data only: how much of the keypoint heatmaps lies on the figure.

    The generator is a pure function of (config, seed, frame index), so each frame's figure mask is
    re-rendered from ``dataset.yaml``. Returns ``{"figure_heatmap_mass": mean over frames and keypoints
    of the softmax heatmap mass on figure pixels, "figure_area_fraction": mean share of the image the
    figure covers, "n_frames": N}`` (both in [0, 1]; heatmaps spread uniformly would give a mass equal
    to the area fraction), or None for any other dataset.
    """
    import numpy as np
    import yaml

    from pipeline.data.images import resize_square

    meta_path = manifest.root / "dataset.yaml"
    try:
        syn = (yaml.safe_load(meta_path.read_text()) or {}).get("synthetic") or {}
        params = syn["parameters"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    from dkp_core.synthetic import SyntheticConfig, render_frame

    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in params["config"].items()}
    gen_cfg, seed = SyntheticConfig(**conf), int(params["seed"])
    idx = [int(i) for i in indices[:max_frames]]
    if not idx:
        return None
    ds = FrameDataset(manifest=manifest, indices=idx, image_size=image_size, use_rgb=False, use_depth=True,
                      depth_reader=reader)
    depth = torch.stack([ds[i]["depth"] for i in range(len(idx))])  # (N, 3, S, S)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        heat = model.detector(depth.to(dev)).heatmaps.float().cpu()  # (N, K, h, h), each map sums to 1
    model.train(was_training)
    h = heat.shape[-1]
    masks = []
    for i in idx:
        mask = render_frame(gen_cfg, seed, int(manifest.path_of(i).stem.lstrip("f"))).mask
        m = resize_square(mask.astype(np.float32), image_size)  # same resize/crop as the frames
        f = image_size // h
        masks.append(m.reshape(h, f, h, f).mean(axis=(1, 3)))  # share of figure pixels per heatmap cell
    mk = torch.from_numpy(np.stack(masks))  # (N, h, h)
    mass = (heat * mk[:, None]).sum(dim=(-1, -2))  # (N, K)
    return {"figure_heatmap_mass": round(float(mass.mean()), 4),
            "figure_area_fraction": round(float(mk.mean()), 4), "n_frames": len(idx)}


def teach_step(recon):
    """The trainer's ``step_fn`` of this stage: AutoLink's masked reconstruction of ``batch["depth"]``. The logged
    value stays a device tensor (the trainer reads it once per metrics line, not every step)."""
    def step_fn(model, batch, sctx):
        x = batch["depth"]
        out = model(x, mask_generator=sctx.generator)
        loss = recon(out.reconstruction.float(), x.float())
        return loss, {"recon_loss": loss.detach()}

    return step_fn


def run(ctx) -> dict:
    import os

    from pipeline.training import resolve_device, train
    from pipeline.training.runtime import check_amp

    m, sec = ctx.plan.manifest, ctx.settings  # teach's section, hflip resolved (registry)
    device = resolve_device(sec.device, int(os.environ.get("LOCAL_RANK", 0)))
    check_amp(sec.amp, device, section="teach")  # an emulated precision is refused before any work
    reader = open_depth(ctx)
    train_idx = valid_train_indices(m, reader, "train")
    ds = FrameDataset(manifest=m, indices=train_idx, image_size=sec.model.image_size, use_rgb=False, use_depth=True,
                      depth_reader=reader, hflip=sec.hflip, seed=sec.seed, depth_norm=sec.depth_norm)
    common.attach_frame_cache(ctx, sec, ds)
    args = common.model_args(sec)
    torch.manual_seed(sec.seed)  # initial weights are part of the run's identity
    model = common.build_model(args)
    recon = common.reconstruction_loss(sec).to(device)
    step_fn = teach_step(recon)

    vis_ds = FrameDataset(manifest=m, indices=m.split("test")[:16] if len(m.split("test")) else train_idx[:16],
                          image_size=sec.model.image_size, use_rgb=True, use_depth=True, depth_reader=reader)
    vis = fixed_batch(vis_ds)

    log = common.train_log(ctx)

    def on_eval(step, model):
        common.log_picture(log, step, common.keypoint_grid(model, vis["depth"], background=vis["depth"],
                                                           out_png=ctx.path / "samples" / f"step_{step:06d}.png"))

    with common.training_progress(), common.training_threads(sec) as threads:
        res = train(run_dir=ctx.path, model=model, dataset=ds.loader_view(), collate_fn=collate_frames,
                    step_fn=step_fn, settings=common.train_settings(sec),
                    config=ctx.stage.inputs["config"] | {"steps": sec.steps},
                    on_eval=on_eval, config_hash=ctx.stage.key, model_args=args, params=None, train_log=log)
    _finish(ctx, res, "teacher (depth)")
    result = {"steps": res.steps, "final_loss": res.final_loss, "steps_per_s": res.steps_per_s,
              "amp": res.amp_dtype, "world_size": res.world_size, "device": res.device, "n_train_frames": len(ds), **threads}
    test_idx = m.split("test") if len(m.split("test")) else train_idx
    is_main = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_rank() != 0)  # under torchrun only rank 0 reports
    on_figure = figure_heatmap_mass(model, m, reader, test_idx, sec.model.image_size) if is_main else None
    if on_figure is not None:
        result.update(on_figure)
        ctx.console.print(f"heatmap mass on the figure: {on_figure['figure_heatmap_mass']:.3f} (the figure covers "
                          f"{on_figure['figure_area_fraction']:.3f} of the image; {on_figure['n_frames']} test frames)",
                          markup=False)
    return {"result": result}


def _finish(ctx, res, title: str) -> None:
    import os

    from pipeline.viz import loss_curve

    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 owns the pictures
        return

    if res.metrics_path.exists():
        loss_curve(res.metrics_path, ctx.path / "loss.png", title=title)
    samples = sorted((ctx.path / "samples").glob("step_*.png"))
    if samples:
        import shutil

        shutil.copyfile(samples[-1], ctx.path / "keypoints.png")

"""Stage 2 `teach`: the AutoLink teacher trained on the cached depth maps.

Input: per-frame min-max normalised inverse depth, replicated to 3 channels (docs/conventions.md);
the decoder reconstructs that depth image from its masked version and the learned link map.
"""
from __future__ import annotations

import torch

from pipeline.datasets import FrameDataset, valid_train_indices
from pipeline.stages import common


def open_depth(ctx):
    from pipeline.depth_cache import DepthCacheReader

    return DepthCacheReader(ctx.upstream_path("depth"))


def fixed_batch(ds, n: int = 16) -> dict:
    """The first n items (no flip): the same frames in every picture of a run."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def run(ctx) -> dict:
    cfg, m = ctx.cfg, ctx.plan.manifest
    sec = cfg.teach
    reader = open_depth(ctx)
    hflip = ctx.stage.inputs["config"]["hflip"]
    train_idx = valid_train_indices(m, reader, "train")
    ds = FrameDataset(manifest=m, indices=train_idx, image_size=sec.model.image_size, use_rgb=False, use_depth=True,
                      depth_reader=reader, hflip=hflip, seed=sec.seed, depth_norm=sec.depth_norm)
    args = common.model_args(sec)
    torch.manual_seed(sec.seed)  # initial weights are part of the run's identity
    model = common.build_model(args)
    recon = common.reconstruction_loss(sec)

    def step_fn(model, batch, sctx):
        x = batch["depth"]
        out = model(x, mask_generator=sctx.generator)
        loss = recon(out.reconstruction.float(), x.float())
        return loss, {"recon_loss": float(loss.detach())}

    vis_ds = FrameDataset(manifest=m, indices=m.split("test")[:16] if len(m.split("test")) else train_idx[:16],
                          image_size=sec.model.image_size, use_rgb=True, use_depth=True, depth_reader=reader)
    vis = fixed_batch(vis_ds)

    def on_eval(step, model):
        common.keypoint_grid(model, vis["depth"], background=vis["depth"], out_png=ctx.path / "samples" /
                             f"step_{step:06d}.png")

    import os

    from pipeline.train import resolve_device, train

    recon.to(resolve_device(sec.device, int(os.environ.get("LOCAL_RANK", 0))))

    with common.training_progress():
        res = train(run_dir=ctx.path, model=model, dataset=ds, step_fn=step_fn,
                    settings=common.train_settings(sec), config=ctx.stage.inputs["config"] | {"steps": sec.steps},
                    on_eval=on_eval, config_hash=ctx.stage.key, model_args=args, params=None)
    _finish(ctx, res, "teacher (depth)")
    return {"result": {"steps": res.steps, "final_loss": res.final_loss, "steps_per_s": res.steps_per_s,
                       "amp": res.amp_dtype, "world_size": res.world_size, "n_train_frames": len(ds)}}


def _finish(ctx, res, title: str) -> None:
    from pipeline.viz import loss_curve

    if res.metrics_path.exists():
        loss_curve(res.metrics_path, ctx.path / "loss.png", title=title)
    samples = sorted((ctx.path / "samples").glob("step_*.png"))
    if samples:
        import shutil

        shutil.copyfile(samples[-1], ctx.path / "keypoints.png")

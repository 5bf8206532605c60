"""Stage 2 `teach`: the AutoLink teacher trained on the cached depth maps.

Input: per-frame min-max normalised inverse depth, replicated to 3 channels (docs/conventions.md);
the decoder reconstructs that depth image from its masked version and the learned link map.
"""
from __future__ import annotations

import torch

from pipeline.data.datasets import FrameDataset
from pipeline.stages import common


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
    inputs = common.open_training(ctx, "teach")
    m, sec, reader = ctx.plan.manifest, inputs.section, inputs.reader
    ds = FrameDataset(manifest=m, indices=inputs.train_idx, image_size=sec.model.image_size, use_rgb=False,
                      use_depth=True, depth_reader=reader, hflip=sec.hflip, seed=sec.seed, depth_norm=sec.depth_norm)
    common.attach_frame_cache(ctx, sec, ds)
    args = common.model_args(sec)
    torch.manual_seed(sec.seed)  # initial weights are part of the run's identity
    model = common.build_model(args)
    recon = common.reconstruction_loss(sec).to(inputs.device)
    res, result = common.train_stage(ctx, inputs, dataset=ds, model=model, args=args, step_fn=teach_step(recon),
                                     pictures="depth", title="teacher (depth)")
    if ctx.process.is_main:  # under torchrun only rank 0 reports
        test_idx = m.split("test") if len(m.split("test")) else inputs.train_idx
        on_figure = common.figure_mass(model, m, test_idx[:64], sec.model.image_size, "depth", reader, inputs.device)
        if on_figure is not None:
            result["figure_heatmap_mass"] = on_figure
            ctx.console.print(f"heatmap mass on the figure: {on_figure['mass_in_mask']:.3f} (the figure covers "
                              f"{on_figure['mask_area']:.3f} of the image; {on_figure['n_frames']} test frames)",
                              markup=False)
    return {"result": result}

"""Stage 3 `distill`: the RGB student, trained with reconstruction + gamma * (1 - cos) to the frozen teacher.

The teacher (the `teach` artifact) sees the depth map of the same frame with the same flip as the
student's RGB; it stays in eval() and under no_grad (asserted every step). gamma = 0 is plain AutoLink
through the same code path (the baseline). With ``teacher_cache`` the teacher's embeddings are computed
once per (frame, flip) into ``teacher_embeddings.h5`` inside this artifact, so training runs no teacher
forward at all.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.data.datasets import FrameDataset, valid_train_indices
from pipeline.stages import common
from pipeline.stages.teach import _finish, fixed_batch, open_depth


def teacher_embedding(teacher, depth: torch.Tensor, layer: str) -> torch.Tensor:
    """The frozen teacher's ``layer`` tensor for depth input (B, 3, S, S), always in fp32: the live target (inside
    the trainer's autocast) is then the one the embedding cache holds, so ``teacher_cache`` changes only speed."""
    assert not teacher.training, "the teacher must stay in eval() during distillation"
    with torch.no_grad(), torch.autocast(depth.device.type, enabled=False):
        out = teacher.detector(depth.float(), return_features=(layer,))
    return out.features[layer].float()


def embedding_shapes(teacher, student_args: dict, layer: str) -> tuple[tuple, tuple]:
    """(C, h, w) of the teacher's and of a student's ``layer`` tensor."""
    student = common.build_model(student_args).eval()
    with torch.no_grad():
        t = teacher_embedding(teacher, torch.zeros(1, 3, teacher.image_size, teacher.image_size,
                                                   device=next(teacher.parameters()).device), layer)
        s_ = student.detector(torch.zeros(1, 3, student.image_size, student.image_size),
                              return_features=(layer,)).features[layer]
    return tuple(t.shape[1:]), tuple(s_.shape[1:])


def check_embedding_shapes(teacher, student_args: dict, layer: str, flatten: str = "sample",
                           adapter: bool = False):
    """Refuse a teacher/student pair whose ``layer`` tensors cannot be compared; return the adapter's
    (student channels, teacher channels) when ``adapter``, else None.

    The spatial sizes may differ (a teacher at another image_size): the teacher's tensor is resized to the
    student's (:func:`match_target`). The channels must match unless the alignment bridges them: a learned 1x1
    ``adapter``, or ``flatten: attention`` (which has no channel axis)."""
    from pipeline.errors import ConfigError

    t, s_ = embedding_shapes(teacher, student_args, layer)
    if adapter:
        return (s_[0], t[0])
    if t[0] != s_[0] and flatten != "attention":
        raise ConfigError(
            f"distill.layer={layer}: the teacher's tensor is {t} but the student's would be {s_} (other channel "
            f"counts); make distill.model (n_keypoints, width) match teach.model, or bridge them "
            "with distill.adapter: true (a learned 1x1 convolution) or distill.flatten: attention, or set "
            "distill.gamma: 0")
    return None


def match_target(t: torch.Tensor, size: tuple, layer: str) -> torch.Tensor:
    """The teacher's ``layer`` tensor (B, C, h, w) at the student's spatial ``size`` (h', w'): area-averaged when
    smaller, bilinear when larger; heatmaps are renormalised so that each map sums to 1 again."""
    import torch.nn.functional as F

    if tuple(t.shape[-2:]) == tuple(size):
        return t
    smaller = size[0] * size[1] < t.shape[-2] * t.shape[-1]
    out = F.interpolate(t, size=size, mode="area") if smaller else \
        F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    if layer == "heatmaps":
        out = out / out.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return out


def init_from_teacher(student, teacher, init: str) -> None:
    """Copy the trained teacher's weights into the fresh student: ``teacher_detector`` the detector only (links
    and decoder stay random), ``teacher`` all of it. The student's RGB input has the teacher's depth input's
    shape (B, 3, S, S), so the same architecture takes either."""
    from pipeline.errors import ConfigError

    parts = ("detector",) if init == "teacher_detector" else ("detector", "links", "decoder")
    for name in parts:
        src, dst = getattr(teacher, name).state_dict(), getattr(student, name).state_dict()
        bad = sorted(k for k in dst.keys() | src.keys() if k not in src or k not in dst or src[k].shape != dst[k].shape)
        if bad:
            raise ConfigError(
                f"distill.init={init}: the teacher's {name} does not fit the student's ({len(bad)} tensors differ, "
                f"first {bad[0]}); make distill.model match teach.model, or set distill.init: scratch")
        getattr(student, name).load_state_dict({k: v.detach().to("cpu", copy=True) for k, v in src.items()})


class EmbeddingCache:
    """Teacher embeddings per (frame, flip), float32, in one HDF5 file written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._h5 = None

    def __getstate__(self):
        return {"path": self.path, "_h5": None}

    def lookup(self, index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        import h5py

        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r", locking=False)
        pos = self._h5["position"]
        rows = [pos[int(i)] for i in index]
        emb = self._h5["embedding"]
        return torch.from_numpy(np.stack([emb[r, int(f)] for r, f in zip(rows, flip)]))

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def build_embedding_cache(path: Path, teacher, ds: FrameDataset, layer: str, hflip: bool, device, console) -> None:
    """Run the teacher once over every training frame (and its mirror when flips are on)."""
    import h5py

    from pipeline.store.io import fsync_path, replace_durably

    if path.exists():
        return
    n_flip = 2 if hflip else 1
    n_total = int(ds.manifest.split("all").shape[0])
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    teacher = teacher.to(device)
    with h5py.File(tmp, "w") as f:
        position = np.full(n_total, -1, np.int64)
        position[ds.indices] = np.arange(len(ds))
        f.create_dataset("position", data=position)
        emb = None
        bs = 32
        for s in range(0, len(ds), bs):
            items = [ds.load(i, False) for i in range(s, min(s + bs, len(ds)))]
            depth = torch.stack([it["depth"] for it in items]).to(device)
            outs = [teacher_embedding(teacher, depth, layer)]
            if hflip:
                outs.append(teacher_embedding(teacher, depth.flip(-1), layer))
            e = torch.stack(outs, dim=1).cpu().numpy()  # (b, n_flip, *shape)
            if emb is None:
                emb = f.create_dataset("embedding", shape=(len(ds), n_flip, *e.shape[2:]), dtype="float32",
                                       chunks=(1, n_flip, *e.shape[2:]))
            emb[s:s + len(items)] = e
        f.attrs["layer"] = layer
        f.flush()
    fsync_path(tmp)
    replace_durably(tmp, path, strict_dir=False)
    console.print(f"teacher embeddings cached: {len(ds)} frames x {n_flip} flip(s) -> {path.name}")


def target_keypoints(t: torch.Tensor, layer: str) -> torch.Tensor:
    """The teacher's soft-argmax keypoints (B, K, 2) from its ``layer`` tensor (logits or heatmaps)."""
    from dkp_core.keypoints.detector import expected_coordinates, soft_argmax

    if layer == "logits":
        return soft_argmax(t)[0]
    if layer != "heatmaps":
        raise ValueError(f"the teacher's keypoints come from logits or heatmaps, not {layer!r}")
    return expected_coordinates(t)


def distill_step(recon, target, *, gamma: float, layer: str, flatten: bool, keypoint_weight: float = 0.0):
    """The trainer's ``step_fn`` of this stage: reconstruction of ``batch["rgb"]`` + gamma * (1 - cos) between the
    student's ``layer`` tensor and ``target(batch)``, the frozen teacher's (live, or from the embedding cache),
    + ``keypoint_weight`` * the squared distance of the two soft-argmax keypoints.
    ``gamma <= 0`` never calls ``target``: plain AutoLink. A student with a ``distill_adapter`` (``distill.adapter``)
    maps its tensor to the teacher's channels through it first; a teacher tensor of another spatial size is
    resized to the student's (:func:`match_target`)."""
    from dkp_core.losses import distillation_loss, keypoint_distillation_loss

    def step_fn(model, batch, sctx):
        x = batch["rgb"]
        out = model(x, mask_generator=sctx.generator, return_features=(layer,) if gamma > 0 else ())
        rec = recon(out.reconstruction.float(), x.float())
        logs = {"recon_loss": float(rec.detach())}
        if gamma <= 0:
            return rec, logs
        s_ = out.detector_output.features[layer]
        adapter = getattr(sctx.module, "distill_adapter", None)
        if adapter is not None:
            s_ = adapter(s_)  # (B, C_student, h, w) -> (B, C_teacher, h, w)
        t = match_target(target(batch).to(x.device), tuple(s_.shape[-2:]), layer)
        kd = distillation_loss(s_.float(), t, flatten=flatten)
        logs["kd_loss"] = float(kd.detach())
        loss = rec + gamma * kd
        if keypoint_weight > 0:
            kp = keypoint_distillation_loss(out.detector_output.keypoints, target_keypoints(t, layer))
            logs["kp_loss"] = float(kp.detach())
            loss = loss + keypoint_weight * kp
        return loss, logs

    return step_fn


def run(ctx) -> dict:
    from pipeline.training import resolve_device, train

    cfg, m = ctx.cfg, ctx.plan.manifest
    sec = ctx.settings  # distill's section (gamma 0 for the baseline), hflip resolved (registry)
    device = resolve_device(sec.device, int(os.environ.get("LOCAL_RANK", 0)))
    reader = open_depth(ctx)
    hflip, gamma, layer = sec.hflip, sec.gamma, sec.layer
    teacher, _ = common.load_trained(ctx.upstream_path("teach"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.to(device).eval()
    adapter = None
    if gamma > 0:
        adapter = check_embedding_shapes(teacher, common.model_args(sec), layer, sec.flatten, sec.adapter)

    train_idx = valid_train_indices(m, reader, "train")
    use_cache = bool(sec.teacher_cache and gamma > 0)
    ds = FrameDataset(manifest=m, indices=train_idx, image_size=sec.model.image_size, use_rgb=True,
                      use_depth=(gamma > 0 and not use_cache), depth_reader=reader, hflip=hflip, seed=sec.seed,
                      depth_norm=sec.depth_norm)
    cache = None
    if use_cache:
        depth_ds = FrameDataset(manifest=m, indices=train_idx, image_size=cfg.teach.model.image_size,
                                use_rgb=False, use_depth=True, depth_reader=reader, depth_norm=cfg.teach.depth_norm)
        cache_path = ctx.path / "teacher_embeddings.h5"
        build_embedding_cache(cache_path, teacher, depth_ds, layer, hflip, device, ctx.console)
        cache = EmbeddingCache(cache_path)

    args = common.model_args(sec)
    if adapter is not None:  # stored in model.pt's arguments: the student loads whole, adapter included
        args[common.ADAPTER_ARG] = list(adapter)
    torch.manual_seed(sec.seed)
    model = common.build_model(args)
    if sec.init != "scratch":
        init_from_teacher(model, teacher, sec.init)
    recon = common.reconstruction_loss(sec).to(device)

    if cache is not None:
        def target(batch):
            return cache.lookup(batch["index"], batch["flip"])
    else:
        def target(batch):
            return teacher_embedding(teacher, batch["depth"], layer)
    step_fn = distill_step(recon, target, gamma=gamma, layer=layer, flatten=sec.flatten,
                           keypoint_weight=sec.keypoint_weight)

    vis_idx = m.split("test")[:16] if len(m.split("test")) else train_idx[:16]
    vis = fixed_batch(FrameDataset(manifest=m, indices=vis_idx, image_size=sec.model.image_size, use_rgb=True,
                                   use_depth=False))

    log = common.train_log(ctx)

    def on_eval(step, model):
        common.log_picture(log, step, common.keypoint_grid(model, vis["rgb"],
                                                           out_png=ctx.path / "samples" / f"step_{step:06d}.png"))

    try:
        with common.training_progress(), common.training_threads(sec) as threads:
            res = train(run_dir=ctx.path, model=model, dataset=ds, step_fn=step_fn,
                        settings=common.train_settings(sec), config=ctx.stage.inputs["config"] | {"steps": sec.steps},
                        on_eval=on_eval, config_hash=ctx.stage.key, model_args=args, train_log=log)
    finally:
        if cache is not None:
            cache.close()  # h5py keeps files open until closed; later readers in this process need it shut
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    _finish(ctx, res, f"student (RGB), gamma={gamma}")
    return {"result": {"steps": res.steps, "final_loss": res.final_loss, "steps_per_s": res.steps_per_s,
                       "amp": res.amp_dtype, "world_size": res.world_size, "device": res.device,
                       "n_train_frames": len(ds), "teacher_cache": use_cache, **threads}}

"""Stage 3 `distill`: the RGB student, trained with reconstruction + gamma * (1 - cos) to the frozen teacher.

The teacher (the `teach` artifact) sees the depth map of the same frame with the same flip as the
student's RGB; it stays in eval() and under no_grad (asserted every step). gamma = 0 is plain AutoLink
through the same code path (the baseline). With ``teacher_cache`` the teacher's embeddings are computed
once per (frame, flip) into ``teacher_embeddings/`` inside this artifact (under torchrun each rank computes its
share), so training runs no teacher forward at all: the DataLoader reads each batch's targets beside its frames.
"""
from __future__ import annotations

import torch

from dkp_core.keypoints.teacher import FrozenTeacher
from pipeline.data.datasets import FrameDataset, collate_frames
from pipeline.stages import common
from pipeline.stages.distill.teacher_cache import EMBEDDINGS_DIRNAME, EmbeddingCache, WithTargets, build_embedding_cache


def embedding_shapes(teacher: FrozenTeacher, student_args: dict, layer: str) -> tuple[tuple, tuple]:
    """(C, h, w) of the teacher's and of a student's ``layer`` tensor."""
    student = common.build_model(student_args).eval()
    with torch.no_grad():
        t = teacher.embedding(torch.zeros(1, 3, teacher.image_size, teacher.image_size, device=teacher.device), layer)
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
        logs = {"recon_loss": rec.detach()}  # device tensors: the trainer reads them once per metrics line
        if gamma <= 0:
            return rec, logs
        s_ = out.detector_output.features[layer]
        adapter = getattr(sctx.module, "distill_adapter", None)
        if adapter is not None:
            s_ = adapter(s_)  # (B, C_student, h, w) -> (B, C_teacher, h, w)
        t = match_target(target(batch).to(x.device), tuple(s_.shape[-2:]), layer)
        kd = distillation_loss(s_.float(), t, flatten=flatten)
        logs["kd_loss"] = kd.detach()
        loss = rec + gamma * kd
        if keypoint_weight > 0:
            kp = keypoint_distillation_loss(out.detector_output.keypoints, FrozenTeacher.keypoints(t, layer))
            logs["kp_loss"] = kp.detach()
            loss = loss + keypoint_weight * kp
        return loss, logs

    return step_fn


def run(ctx) -> dict:
    from pipeline.training.runtime import barrier, setup_distributed

    inputs = common.open_training(ctx, "distill")
    m, sec, reader = ctx.plan.manifest, inputs.section, inputs.reader  # gamma 0 for the baseline
    # Under torchrun: join the process group now (the trainer reuses it), so the ranks can share the cache build.
    dist_env, device = setup_distributed(sec.device)
    hflip, gamma, layer = sec.hflip, sec.gamma, sec.layer
    trained, payload = common.load_trained(ctx.upstream_path("teach"))
    teacher = FrozenTeacher(trained).to(device)
    adapter = None
    if gamma > 0:
        adapter = check_embedding_shapes(teacher, common.model_args(sec), layer, sec.flatten, sec.adapter)

    use_cache = bool(sec.teacher_cache and gamma > 0)
    ds = FrameDataset(manifest=m, indices=inputs.train_idx, image_size=sec.model.image_size, use_rgb=True,
                      use_depth=(gamma > 0 and not use_cache), depth_reader=reader, hflip=hflip, seed=sec.seed,
                      depth_norm=sec.depth_norm)
    common.attach_frame_cache(ctx, sec, ds)
    cache = None
    if use_cache:
        # the teacher's input as it was trained on: its size and depth normalisation from its own model.pt
        depth_ds = FrameDataset(manifest=m, indices=inputs.train_idx, image_size=teacher.image_size, use_rgb=False,
                                use_depth=True, depth_reader=reader, depth_norm=teacher_depth_norm(payload))
        common.attach_frame_cache(ctx, sec, depth_ds, build=False)  # one pass: only the teacher's, if teach built it
        cache_path = ctx.path / EMBEDDINGS_DIRNAME
        build_embedding_cache(cache_path, teacher, depth_ds, layer, hflip, device, ctx.console, rank=dist_env.rank,
                              world=dist_env.world_size, barrier=lambda: barrier(dist_env, device),
                              num_workers=common.train_settings(sec).num_workers)
        cache = EmbeddingCache(cache_path)

    args = common.model_args(sec)
    if adapter is not None:  # stored in model.pt's arguments: the student loads whole, adapter included
        args[common.ADAPTER_ARG] = list(adapter)
    torch.manual_seed(sec.seed)
    model = common.build_model(args)
    if sec.init != "scratch":
        init_from_teacher(model, teacher.model, sec.init)
    recon = common.reconstruction_loss(sec).to(device)

    if cache is not None:
        def target(batch):
            return batch["target"]  # read with the batch by WithTargets, already on the device
    else:
        def target(batch):
            return teacher.embedding(batch["depth"], layer)
    step_fn = distill_step(recon, target, gamma=gamma, layer=layer, flatten=sec.flatten,
                           keypoint_weight=sec.keypoint_weight)
    try:
        res, result = common.train_stage(
            ctx, inputs, dataset=ds, model=model, args=args, step_fn=step_fn, pictures="rgb",
            title=f"student (RGB), gamma={gamma}", record={"teacher_cache": use_cache},
            collate_fn=WithTargets(cache, collate_frames) if cache is not None else collate_frames)
    finally:
        if cache is not None:
            cache.close()  # drop its memory maps
    teacher.check()  # frozen from the first step to the last
    return {"result": result}


def teacher_depth_norm(payload: dict) -> str:
    """The depth normalisation the teacher of ``payload`` (its model.pt) was trained with."""
    info = payload.get("info") or {}
    return info.get("depth_norm") or (payload.get("config") or {}).get("depth_norm") or "minmax"

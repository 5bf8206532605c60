"""Stage 3 `distill`: the RGB student, trained with reconstruction + gamma * (1 - cos) to the frozen teacher.

The teacher (the `teach` artifact) sees the depth map of the same frame with the same flip as the
student's RGB; it stays in eval() and under no_grad (asserted every step). gamma = 0 is plain AutoLink
through the same code path (the baseline). With ``teacher_cache`` the teacher's embeddings are computed
once per (frame, flip) into ``teacher_embeddings/`` inside this artifact (under torchrun each rank computes its
share), so training runs no teacher forward at all: the DataLoader reads each batch's targets beside its frames.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from pipeline.data.datasets import FrameDataset, collate_frames, valid_train_indices
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


EMBEDDINGS_DIRNAME = "teacher_embeddings"
EMBEDDINGS_FORMAT = "dkp.teacher-embeddings/1"
_INDEX = "index.json"  # written last: the cache is complete when it exists
_POSITION = "position.npy"


def _part_name(part: int, parts: int) -> str:
    return f"part-{part:05d}-of-{parts:05d}.npy"


class EmbeddingCache:
    """Teacher embeddings per (training frame, flip), float32, read through memory maps.

    A folder (:data:`EMBEDDINGS_DIRNAME`): ``position.npy`` (N_manifest,) int64 = row of each manifest index or -1;
    ``part-RRRRR-of-WWWWW.npy`` (rows of part r, n_flip, *shape) float32, consecutive row ranges, one per rank that
    built it; ``index.json`` (format, layer, n_flip, shape, rows, parts with their row ranges), written last.
    ``.npy`` rather than HDF5: a batch is one fancy-indexed read of a memory map per part (~5 us a row here),
    where h5py reads chunked rows one at a time or fancy-indexes them hundreds of times slower
    (research/gpu.md section 6)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        from pipeline.errors import CheckpointError

        try:
            self.index = json.loads((self.path / _INDEX).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: no complete teacher-embedding cache here ({e}); delete the folder "
                                  "and re-run distill to rebuild it") from None
        if self.index.get("format") != EMBEDDINGS_FORMAT:
            raise CheckpointError(f"{self.path / _INDEX}: format {self.index.get('format')!r}, expected "
                                  f"{EMBEDDINGS_FORMAT!r}; delete the folder and re-run distill to rebuild it")
        self.layer, self.n_flip = self.index["layer"], int(self.index["n_flip"])
        self.shape = tuple(self.index["shape"])
        self._starts = np.array([p["start"] for p in self.index["parts"]], dtype=np.int64)
        self._maps: Optional[list[np.ndarray]] = None
        self._position: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_maps": None, "_position": None}

    def _open(self) -> None:
        self._position = np.load(self.path / _POSITION)
        self._maps = [np.load(self.path / p["file"], mmap_mode="r") for p in self.index["parts"]]

    def lookup(self, index: Any, flip: Any) -> torch.Tensor:
        """Targets (B, *shape) float32 of manifest indices ``index`` (B,) with flip flags ``flip`` (B,): CPU tensors
        or arrays, as the DataLoader collates them. One vectorised read per part the batch touches."""
        if self._maps is None:
            self._open()
        if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in (index, flip)):
            raise ValueError("EmbeddingCache.lookup takes indices on the CPU (a CUDA index would make the host wait "
                             "for the GPU); look up before moving the batch to the device")
        rows = self._position[np.asarray(index, dtype=np.int64)]  # (B,)
        flips = np.asarray(flip).astype(np.int64)  # (B,) 0 or 1
        if (rows < 0).any():
            raise KeyError(f"manifest frames {np.asarray(index)[rows < 0][:5].tolist()} are not in the teacher "
                           f"embedding cache {self.path} (not training frames)")
        part = np.searchsorted(self._starts, rows, side="right") - 1  # (B,)
        out = np.empty((len(rows), *self.shape), dtype=np.float32)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self._maps[p][rows[sel] - self._starts[p], flips[sel]]
        return torch.from_numpy(out)

    def close(self) -> None:
        self._maps, self._position = None, None


class WithTargets:
    """A DataLoader ``collate_fn``: the batch as ``collate`` makes it (the default collation, or
    :func:`~pipeline.data.datasets.collate_frames` for a FrameDataset's ``loader_view``) plus ``target``, the cached
    teacher embeddings of the batch. It runs where the batch is assembled (a DataLoader worker, or the main process
    without workers), on the batch's CPU indices: one vectorised read per batch, pinned and copied to the device
    with the frames."""

    def __init__(self, cache: EmbeddingCache, collate: Optional[Callable[[list], dict]] = None) -> None:
        self.cache, self.collate = cache, collate

    def __call__(self, items: list) -> dict:
        if self.collate is None:
            from torch.utils.data import default_collate

            batch = default_collate(items)
        else:
            batch = self.collate(items)
        batch["target"] = self.cache.lookup(batch["index"], batch["flip"])
        return batch


class _DepthRows(torch.utils.data.Dataset):
    """Depth inputs (3, S, S) of dataset positions [lo, hi), unflipped: what the teacher embeds."""

    def __init__(self, ds, lo: int, hi: int) -> None:
        self.ds, self.lo, self.hi = ds, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.ds.load(self.lo + j, False)["depth"]


def build_embedding_cache(path: Path, teacher, ds, layer: str, hflip: bool, device, console, *, rank: int = 0,
                          world: int = 1, barrier: Optional[Callable[[], None]] = None, num_workers: int = 0,
                          batch_size: int = 32) -> None:
    """Run the teacher once over every training frame of ``ds`` (and its mirror when ``hflip``) into the folder
    ``path`` (:class:`EmbeddingCache`). Under torchrun each of the ``world`` ranks embeds its own consecutive share
    of the frames into its own part file (so N ranks build it N times faster), ``barrier`` waits for all of them,
    then rank 0 writes the position table and the index. Resumable: a finished part (published by rename) is kept;
    nothing is complete before the index exists."""
    from torch.utils.data import DataLoader

    from pipeline.store.io import atomic_file, write_json_atomic

    path = Path(path)
    wait = barrier or (lambda: None)
    if (path / _INDEX).exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    n, n_flip = len(ds), 2 if hflip else 1
    lo, hi = rank * n // world, (rank + 1) * n // world
    part = path / _part_name(rank, world)
    teacher = teacher.to(device)
    shape = tuple(teacher_embedding(teacher, ds.load(0, False)["depth"][None].to(device), layer).shape[1:])
    if not part.exists():
        tmp = part.with_name(part.name + f".tmp-{os.getpid()}")  # the pattern a lock takeover cleans up
        rows_shape = (hi - lo, n_flip, *shape)
        loader = DataLoader(_DepthRows(ds, lo, hi), batch_size=batch_size, num_workers=num_workers,
                            pin_memory=torch.device(device).type == "cuda")
        # Written in order as a plain file (an .npy header, then the rows), not through a writable memory map: a
        # full disk is then an OSError at the write (one StorageError naming the file), never a SIGBUS on a page
        # that cannot be allocated; atomic_file renames it into place only when complete.
        with atomic_file(part, tmp, what="the teacher-embedding cache",
                         needed=int(np.prod(rows_shape)) * 4) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": rows_shape})
            for depth in loader:  # (b, 3, S, S)
                depth = depth.to(device, non_blocking=True)
                outs = [teacher_embedding(teacher, depth, layer)]
                if hflip:
                    outs.append(teacher_embedding(teacher, depth.flip(-1), layer))
                f.write(np.ascontiguousarray(torch.stack(outs, dim=1).cpu().numpy(), np.float32))  # (b, n_flip, ...)
    wait()  # every part is written
    if rank == 0:
        n_total = int(ds.manifest.split("all").shape[0])
        position = np.full(n_total, -1, np.int64)
        position[ds.indices] = np.arange(n)
        with atomic_file(path / _POSITION) as f:
            np.save(f, position)
        parts = [{"file": _part_name(r, world), "start": r * n // world, "stop": (r + 1) * n // world}
                 for r in range(world)]
        write_json_atomic(path / _INDEX, {"format": EMBEDDINGS_FORMAT, "layer": layer, "n_flip": n_flip,
                                          "shape": list(shape), "rows": n, "dtype": "float32", "parts": parts})
        for stale in path.glob("part-*.npy"):  # parts of an interrupted build with another number of ranks
            if stale.name not in {p["file"] for p in parts}:
                stale.unlink(missing_ok=True)
        console.print(f"teacher embeddings cached: {n} frames x {n_flip} flip(s) -> {path.name}/"
                      + (f" ({world} ranks, one part each)" if world > 1 else ""))
    wait()  # the index exists for every rank


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
            kp = keypoint_distillation_loss(out.detector_output.keypoints, target_keypoints(t, layer))
            logs["kp_loss"] = kp.detach()
            loss = loss + keypoint_weight * kp
        return loss, logs

    return step_fn


def run(ctx) -> dict:
    from pipeline.training import train
    from pipeline.training.runtime import barrier, check_amp, setup_distributed

    cfg, m = ctx.cfg, ctx.plan.manifest
    sec = ctx.settings  # distill's section (gamma 0 for the baseline), hflip resolved (registry)
    # Under torchrun: join the process group now (the trainer reuses it), so the ranks can share the cache build.
    dist_env, device = setup_distributed(sec.device)
    check_amp(sec.amp, device, section="distill")  # an emulated precision is refused before any work
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
    common.attach_frame_cache(ctx, sec, ds)
    cache = None
    if use_cache:
        depth_ds = FrameDataset(manifest=m, indices=train_idx, image_size=cfg.teach.model.image_size,
                                use_rgb=False, use_depth=True, depth_reader=reader, depth_norm=cfg.teach.depth_norm)
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
        init_from_teacher(model, teacher, sec.init)
    recon = common.reconstruction_loss(sec).to(device)

    if cache is not None:
        def target(batch):
            return batch["target"]  # read with the batch by WithTargets, already on the device
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
            res = train(run_dir=ctx.path, model=model, dataset=ds.loader_view(), step_fn=step_fn,
                        settings=common.train_settings(sec), config=ctx.stage.inputs["config"] | {"steps": sec.steps},
                        on_eval=on_eval, config_hash=ctx.stage.key, model_args=args, train_log=log,
                        collate_fn=WithTargets(cache, collate_frames) if cache is not None else collate_frames)
    finally:
        if cache is not None:
            cache.close()  # drop its memory maps
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    _finish(ctx, res, f"student (RGB), gamma={gamma}")
    return {"result": {"steps": res.steps, "final_loss": res.final_loss, "steps_per_s": res.steps_per_s,
                       "amp": res.amp_dtype, "world_size": res.world_size, "device": res.device,
                       "n_train_frames": len(ds), "teacher_cache": use_cache, **threads}}

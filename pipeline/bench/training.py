"""The training-step cases: AutoLink's step and the distillation step, built from the stages' own step function.

Both run :func:`pipeline.stages.distill.run.distill_step` (at gamma 0 it is plain AutoLink, the reconstruction step
the teach stage runs on its depth input) inside one optimiser step as the trainer runs it (zero_grad, the step
under autocast, GradScaler, the trainer's own AdamW, :func:`pipeline.training.runtime.make_optimizer`, with the
config's default lr and weight decay: fused on CUDA). ``recon_loss: perceptual`` + ``amp: fp16`` is the paper's
step (AutoLink's VGG16 loss, random weights: the same cost as ImageNet's; fp16 with a GradScaler). The
distillation target comes from a live frozen teacher (:class:`dkp_core.keypoints.teacher.FrozenTeacher`) or from
the stage's teacher-embedding cache (written by :func:`~pipeline.stages.distill.teacher_cache.build_embedding_cache`), and each
distillation step takes its batch as the trainer does: from the trainer's DataLoader (the cached targets read by
the stage's collate, :class:`~pipeline.stages.distill.teacher_cache.WithTargets`, on CPU indices) through the trainer's
``to_device``. The AutoLink step's input is a random tensor already on the device.

Every step case counts the host reads of its first timed step (:class:`pipeline.training.syncs.HostReadCounter`:
the project's and all) and, on CUDA, the syncs torch's sync debug mode reports. :func:`case_data_loader` measures
what the trainer's DataLoader delivers from the teach stage's dataset, :func:`case_trainer_syncs` the host reads
of the trainer's real loop (``bench precision``, each preset's precision against fp32, is in ``precision.py``).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.bench.harness import WARMUP, Case, amp_name, amp_of, autocast, bench_device, rate, sync

N_KEYPOINTS = 16  # AutoLink's K for Human3.6M / DeepFashion
WIDTH = 64  # AutoLink's detector/decoder width
BASELINE_WIDTH = 16  # the synthetic preset's width
PRESET_KEYPOINTS = 10  # the synthetic preset's K


def _autolink(size: int, width: int, device, n_keypoints: int = N_KEYPOINTS):
    from dkp_core.keypoints import AutoLink

    return AutoLink(n_keypoints=n_keypoints, image_size=size, heatmap_size=size // 4, width=width).to(device)


def _reconstruction_loss(name: str, vgg_size: int | None = None):
    """A reconstruction loss by name; ``perceptual`` with random VGG16 weights, which cost exactly what the
    ImageNet ones cost (same layers, same shapes), so no weight file is needed to time it. ``vgg_size``: VGG's
    input side instead of AutoLink's 224 (tests on a CPU only: fp16 autocast is emulated there)."""
    import warnings

    import torch.nn.functional as F

    from dkp_core.losses import PerceptualLoss, make_reconstruction_loss

    if name == "perceptual":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = make_reconstruction_loss("perceptual", vgg_state_dict=None)
        if vgg_size is not None:
            class _Smaller(type(loss)):
                def _prepare(self, x):
                    return F.interpolate(PerceptualLoss._prepare(self, x), size=(vgg_size, vgg_size), mode="bilinear",
                                         align_corners=False)

            loss.__class__ = _Smaller
        return loss
    return make_reconstruction_loss(name)


def _amp(p: dict, device):
    """The autocast dtype a case asks for: ``amp`` "bf16" | "fp16" | any other true value = the device's AMP dtype."""
    import torch

    if p.get("amp") in ("bf16", "fp16"):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[p["amp"]]
    return amp_of(p, device)


def _counted(step, device, counts: dict):
    """``step`` whose second call (the first timed one, after the warm-up) counts its host reads into ``counts``:
    ``host_reads_project`` (pipeline/, dkp_core/), ``host_reads_all`` (torch's own too: on a CPU those include
    AdamW's CPU step counters, no sync) and on CUDA ``cuda_syncs`` (torch's sync debug mode, every sync it sees)."""
    import warnings

    import torch

    from pipeline.training.syncs import HostReadCounter

    calls = {"n": 0}

    def wrapped():
        calls["n"] += 1
        if calls["n"] != 2:
            return step()
        counter = HostReadCounter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with counter:
                    out = step()
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        counts.update(host_reads_project=len(counter.project), host_reads_all=len(counter.reads))
        if device.type == "cuda":
            counts["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        return out

    return wrapped


def _optimiser_step(model, step_fn, batch, p: dict, device):
    """``(step, amp, counts)``: ``step()`` is one optimiser step of ``step_fn`` on ``batch`` (a dict, or a
    function returning the step's batch) as the trainer takes it; ``counts`` gets the host reads of the first
    timed step (:func:`_counted`)."""
    import torch

    from pipeline.config import DistillConfig
    from pipeline.training import StepContext, TrainSettings
    from pipeline.training.runtime import make_optimizer

    defaults = DistillConfig()
    opt = make_optimizer(model.parameters(), TrainSettings(lr=defaults.lr, weight_decay=defaults.weight_decay),
                         device)
    amp = _amp(p, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    gen = torch.Generator(device=device).manual_seed(0)
    sctx = StepContext(step=0, epoch=0, rank=0, world_size=1, device=device, generator=gen, module=model,
                       amp_dtype=amp)
    next_batch = batch if callable(batch) else (lambda: batch)

    def step():
        b = next_batch()
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss, _ = step_fn(model, b, sctx)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    counts: dict = {}
    return _counted(step, device, counts), amp, counts


def build_autolink_step(p: dict) -> Case:
    """One AutoLink training step (forward, reconstruction loss ``p["recon_loss"]`` (default l1ssim; perceptual with
    ``p["vgg_size"]`` for tests), backward, AdamW) as the trainer does it; ``amp: fp16`` with perceptual is the
    paper's step."""
    import torch

    from pipeline.stages.distill.run import distill_step

    device = bench_device(p["device"])
    torch.manual_seed(0)
    model = _autolink(p["size"], p["width"], device, p.get("n_keypoints", N_KEYPOINTS)).train()
    if p.get("channels_last"):
        model.to(memory_format=torch.channels_last)  # what the trainer does (train.channels_last)
    recon = _reconstruction_loss(p.get("recon_loss", "l1ssim"), p.get("vgg_size")).to(device)
    x = torch.rand(p["batch"], 3, p["size"], p["size"], device=device) * 2 - 1  # (B, 3, S, S)
    step_fn = distill_step(recon, None, gamma=0.0, layer="logits", flatten="sample")  # gamma 0: no target
    step, amp, counts = _optimiser_step(model, step_fn, {"rgb": x}, p, device)
    n_params = sum(t.numel() for t in model.parameters())
    n_loss = sum(t.numel() for t in recon.parameters())  # the perceptual loss's frozen VGG16
    return Case(step, device=device, extra=lambda: {
        "params_m": round(n_params / 1e6, 3), "amp": amp_name(amp),
        "recon_loss": p.get("recon_loss", "l1ssim"), "loss_params_m": round(n_loss / 1e6, 3),
        "channels_last": bool(p.get("channels_last")), **counts})


class _RandomDepthFrames:
    """What :func:`~pipeline.stages.distill.teacher_cache.build_embedding_cache` reads of its FrameDataset (``indices``,
    ``manifest.split("all")``, ``load(i, flip)["depth"]``), for ``depth`` (N, 3, S, S): frames 0..N-1, all training."""

    def __init__(self, depth) -> None:
        import numpy as np

        self.depth = depth
        self.indices = np.arange(len(depth))
        self.manifest = self

    def split(self, _name: str):
        return self.indices

    def __len__(self) -> int:
        return len(self.depth)

    def load(self, i: int, _flip: bool) -> dict:
        return {"depth": self.depth[i]}


class _RandomFrames:
    """In-memory training frames as the distill stage's dataset gives them (an EpochDataset): ``rgb`` (3, S, S),
    ``depth`` (live teacher only), manifest ``index``, ``flip`` (none)."""

    def __init__(self, rgb, depth=None) -> None:
        self.rgb, self.depth = rgb, depth

    def __len__(self) -> int:
        return len(self.rgb)

    def get(self, i: int, epoch: int) -> dict:
        import torch

        item = {"rgb": self.rgb[i], "index": torch.tensor(i), "flip": torch.tensor(False)}
        if self.depth is not None:
            item["depth"] = self.depth[i]
        return item


def build_distill_step(p: dict) -> Case:
    """A distillation step: student AutoLink step + (live frozen teacher | cached embeddings) + gamma (1 - cos)
    (the config's default gamma, layer and flatten); the whole step under autocast when ``p["amp"]`` (as the
    trainer runs it), channels_last when asked. Each step's batch comes as in the trainer: the next batch of the
    trainer's DataLoader (:func:`pipeline.training.loop.make_loader`, ``p["workers"]`` processes, default 0 so the
    lookup's cost shows in the step; pinned on CUDA) over B x (steps + warm-up) random frames, through
    ``to_device``; with the cache the collate reads the targets (CPU indices, one vectorised read per batch).
    The cached case first builds the embedding cache of those frames with both flips, untimed (on a CPU the peak
    RSS includes it)."""
    import io

    import torch
    from rich.console import Console

    from pipeline.config import DistillConfig
    from dkp_core.keypoints.teacher import FrozenTeacher
    from pipeline.stages.distill.run import distill_step
    from pipeline.stages.distill.teacher_cache import EmbeddingCache, WithTargets, build_embedding_cache
    from pipeline.training import StepBatchSampler, TrainSettings
    from pipeline.training.loop import make_loader
    from pipeline.training.runtime import to_device

    device = bench_device(p["device"])
    defaults = DistillConfig()
    B, S, steps = p["batch"], p["size"], p["steps"]
    torch.manual_seed(0)
    width = p.get("width", WIDTH)
    student = _autolink(S, width, device).train()
    recon = _reconstruction_loss("l1ssim").to(device)
    teacher = _autolink(S, width, device)
    if p.get("channels_last"):
        teacher.to(memory_format=torch.channels_last)
    teacher = FrozenTeacher(teacher)
    n = B * (steps + 2 * WARMUP + 2)  # the alone run's and the interleaved run's steps, each frame once
    rgb = torch.rand(n, 3, S, S) * 2 - 1  # (N, 3, S, S) on the CPU, as a dataset gives them
    depth = torch.rand(n, 3, S, S) * 2 - 1
    tmp, cache, collate = None, None, None
    target_times: list[float] = []  # the live teacher's forward, or the cached targets' read
    if p["mode"] == "live":
        frames = _RandomFrames(rgb, depth)

        def target(b):
            return teacher.embedding(b["depth"], defaults.layer)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dkp-bench-")
        path = Path(tmp.name) / "teacher_embeddings"
        build_embedding_cache(path, teacher, _RandomDepthFrames(depth), defaults.layer, True, device,
                              Console(file=io.StringIO()))
        del teacher
        cache = EmbeddingCache(path)
        frames, collate = _RandomFrames(rgb), WithTargets(cache)
        real_lookup = cache.lookup

        def timed_lookup(index, flip):  # target_s of the cached case: the collate's read of the batch
            t0 = time.perf_counter()
            out = real_lookup(index, flip)
            target_times.append(time.perf_counter() - t0)
            return out

        cache.lookup = timed_lookup

        def target(b):
            return b["target"]

    workers = int(p.get("workers", 0))  # 0: the lookup runs in this process, so target_s sees it
    settings = TrainSettings(batch_size=B, num_workers=workers)
    sampler = StepBatchSampler(dataset_len=n, batch_size=B, seed=0, start_step=0, end_step=10 ** 9)
    batches = iter(make_loader(frames, sampler, settings, device, collate))

    def timed_target(b):
        if cache is not None:
            return target(b)
        t0 = time.perf_counter()
        t = target(b)
        sync(device)
        target_times.append(time.perf_counter() - t0)
        return t

    def next_batch():
        return to_device(next(batches), device)

    if p.get("channels_last"):
        student.to(memory_format=torch.channels_last)  # what the trainer does (train.channels_last)
    step_fn = distill_step(recon, timed_target, gamma=defaults.gamma, layer=defaults.layer, flatten=defaults.flatten)
    step, amp, counts = _optimiser_step(student, step_fn, next_batch, p, device)

    def cleanup():
        if tmp is not None:
            cache.close()
            tmp.cleanup()

    return Case(step, device=device, extra=lambda: {"target_s": rate(target_times[WARMUP:])["median_s"],
                                                    "amp": amp_name(amp), "workers": workers,
                                                    "channels_last": bool(p.get("channels_last")), **counts},
                cleanup=cleanup)


def case_train_window(p: dict) -> dict:
    """The AutoLink step of ``p["params"]`` on ``p["threads"]`` torch threads, in a process of its own: after the
    warm-up it writes ``p["ready"]``, waits for ``p["go"]`` (so that processes started together are timed over
    the same window) and times ``steps`` steps. Returns the window's absolute start and end (``time.time()``)."""
    import os

    import torch

    torch.set_num_threads(int(p["threads"]))
    params = p["params"]
    case = build_autolink_step(params)
    for _ in range(WARMUP):
        case.step()
    Path(p["ready"]).touch()
    deadline = time.time() + 600
    while not os.path.exists(p["go"]):
        if time.time() > deadline:
            raise TimeoutError("no go signal within 600 s")
        time.sleep(0.01)
    t0 = time.time()
    for _ in range(params["steps"]):
        case.step()
    return {"start": t0, "end": time.time(), "steps": params["steps"], "threads": torch.get_num_threads()}


def case_data_loader(p: dict) -> dict:
    """The data side's ceiling: samples/s that the trainer's DataLoader (:func:`pipeline.training.loop.make_loader`,
    ``p["workers"]`` processes, None: the trainer's default from the cores; pinned on CUDA; the items' parts
    converted per batch by ``collate_frames``, as the trainer reads them) delivers from the teach stage's dataset
    (depth cache + frames at ``p["size"]`` px, flips on), over a built-in synthetic dataset of ``p["frames"]`` frames
    of ``p["frame_size"]`` px (PNG) with its depth imported (``run --until depth``, untimed). Batches of
    ``p["batch"]``; the first ``WARMUP`` batches (worker start-up) untimed. ``samples_per_s_per_worker`` divides by the workers (0 = the
    main process, counted as 1)."""
    import io

    import torch
    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.data.datasets import FrameDataset, collate_frames, valid_train_indices
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.runner import run_pipeline
    from pipeline.training import StepBatchSampler, TrainSettings
    from pipeline.training.loop import make_loader
    from pipeline.training.settings import default_num_workers
    from pipeline.training.runtime import to_device

    device = bench_device(p["device"])
    workers = p.get("workers")
    workers = default_num_workers(device.type) if workers is None else int(workers)  # the trainer's default
    B, n_batches = p["batch"], int(p["steps"])
    with tempfile.TemporaryDirectory(prefix="dkp-bench-data-") as tmp:
        root, store = Path(tmp) / "data", Path(tmp) / "store"
        frames = max(int(p["frames"]), B + 2)
        cfg = load_config("synthetic", [f"data.root={root}", f"data.synth_frames={frames}",
                                        f"data.synth_image_size={p['frame_size']}"])
        plan = run_pipeline(cfg, str(store), until="depth", console=Console(file=io.StringIO()))
        m = plan.manifest
        reader = DepthCacheReader(plan.store.path("depth", plan.stages["depth"].key))
        idx = valid_train_indices(m, reader, "train")
        ds = FrameDataset(manifest=m, indices=idx, image_size=p["size"], use_rgb=False, use_depth=True,
                          depth_reader=reader, hflip=True, seed=0)
        settings = TrainSettings(batch_size=B, num_workers=workers)
        sampler = StepBatchSampler(dataset_len=len(ds), batch_size=B, seed=0, start_step=0,
                                   end_step=n_batches + WARMUP)
        # what the trainer reads: the items' parts, converted per batch (no frame cache: `bench frames` has it)
        it = iter(make_loader(ds.loader_view(), sampler, settings, device, collate_fn=collate_frames))
        for _ in range(WARMUP):
            to_device(next(it), device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            batch = to_device(next(it), device)
        sync(device)
        seconds = time.perf_counter() - t0
        del it
        reader.close()
    per_s = n_batches * B / seconds
    return {"samples_per_s": round(per_s, 1), "samples_per_s_per_worker": round(per_s / max(1, workers), 1),
            "workers": workers, "batch": B, "size": p["size"], "frames": frames, "frame_size": p["frame_size"],
            "frame_format": "PNG (synthetic)", "frame_cache": False, "batches": n_batches,
            "sample": f"depth (3, {p['size']}, {p['size']})",
            "pinned": bool(device.type == "cuda" and batch["depth"].is_cuda)}


def case_trainer_syncs(p: dict) -> dict:
    """The trainer's own loop (:func:`pipeline.training.train`: AutoLink at ``p["width"]``, ``p["size"]`` px, batch
    ``p["batch"]``, l1ssim, ``p["amp"]``, channels_last) for ``2 * p["log_every"]`` steps on in-memory random
    frames, counting every host read per step: the project's (:class:`~pipeline.training.syncs.HostReadCounter`)
    and, on CUDA, the syncs torch's sync debug mode reports. Target: at most one per ``log_every`` steps."""
    import warnings

    import torch

    from dkp_core.losses import make_reconstruction_loss
    from pipeline.stages.teach.run import teach_step
    from pipeline.training import TrainSettings, train
    from pipeline.training.syncs import HostReadCounter, counting_step

    device = bench_device(p["device"])
    B, S, log_every = p["batch"], p["size"], int(p["log_every"])
    steps = 2 * log_every
    torch.manual_seed(0)
    depth = torch.rand(B * steps, 3, S, S) * 2 - 1

    class Frames:
        def __len__(self):
            return len(depth)

        def get(self, i, epoch):
            return {"depth": depth[i]}

    amp = p.get("amp") or "off"
    settings = TrainSettings(steps=steps, batch_size=B, amp=amp, log_every=log_every, checkpoint_every=log_every,
                             eval_every=0, num_workers=0, device="cuda" if device.type == "cuda" else "cpu",
                             allow_slow_amp=True)
    counter = HostReadCounter()
    marks: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="dkp-bench-syncs-") as tmp, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inner = counting_step(teach_step(make_reconstruction_loss("l1ssim").to(device)), counter)

        def step_fn(model, batch, ctx):
            marks[ctx.step] = len(caught)
            return inner(model, batch, ctx)

        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                res = train(run_dir=Path(tmp), model=_autolink(S, p["width"], torch.device("cpu")), dataset=Frames(),
                            step_fn=step_fn, settings=settings, config={"bench": "syncs"}, config_hash="bench")
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    project = counter.by_tag()
    out = {"steps": steps, "log_every": log_every, "amp": res.amp_dtype, "steps_per_s": round(res.steps_per_s, 3),
           "host_reads_project": sum(v for k, v in project.items() if k is not None),
           "host_reads_project_per_step": {str(k): v for k, v in sorted(project.items()) if k is not None},
           "host_reads_all": sum(1 for r in counter.reads if r.tag is not None)}
    out["host_reads_per_log_interval"] = round(out["host_reads_project"] / (steps / log_every), 3)
    if device.type == "cuda":
        per_step = {s: marks.get(s + 1, len(caught)) - marks[s] for s in range(steps)}
        out["cuda_syncs_per_step"] = {str(s): n for s, n in per_step.items()}
        out["cuda_syncs_per_log_interval"] = round(sum(per_step.values()) / (steps / log_every), 3)
    return out

"""No host sync in a training step: the project's code reads tensors back (``.item()``, ``.tolist()``,
``float(t)``, ``bool(t)``, ``int(t)``) at most once per ``log_every`` steps, and only at the sync points.

Counted on CPU with :class:`pipeline.training.syncs.HostReadCounter` (the methods replaced for the block, each
call attributed to the file that made it and to the trainer's step), through the real trainer and the stages'
own step functions: AutoLink's reconstruction step (teach) and the distillation step with cached teacher
targets read by the DataLoader's collate (distill), then the two stages themselves on the tiny experiment.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training import TrainSettings, train
from pipeline.training.syncs import HostReadCounter, counting_step

STEPS, LOG_EVERY = 12, 4
SYNC_STEPS = {s - 1 for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)}  # 0-based steps that end at a sync point


class RandomFrames:
    """``n`` random depth/RGB frames of ``size`` px as the stages' datasets give them (an EpochDataset), plus what
    build_embedding_cache reads (``indices``, ``manifest.split("all")``, ``load``)."""

    def __init__(self, n: int = 16, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.depth = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.rgb = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.indices = np.arange(n)
        self.manifest = self

    def split(self, _name: str) -> np.ndarray:
        return self.indices

    def __len__(self) -> int:
        return len(self.depth)

    def load(self, i: int, flip: bool = False) -> dict:
        return {"depth": self.depth[i], "rgb": self.rgb[i], "index": torch.tensor(i), "flip": torch.tensor(flip)}

    def get(self, i: int, epoch: int) -> dict:
        return self.load(i, False)


def _autolink():
    from dkp_core.keypoints import AutoLink

    torch.manual_seed(0)
    return AutoLink(n_keypoints=4, image_size=16, heatmap_size=4, width=4)


def _settings(**kw) -> TrainSettings:
    base = dict(steps=STEPS, batch_size=4, lr=1e-3, seed=0, amp="off", checkpoint_every=LOG_EVERY,
                log_every=LOG_EVERY, eval_every=0, num_workers=0, device="cpu")
    return TrainSettings(**(base | kw))


def _loop_reads(counter: HostReadCounter) -> dict:
    """Project reads made during the loop (tagged with a step), per step."""
    return {tag: n for tag, n in counter.by_tag().items() if tag is not None}


def test_teach_step_reads_the_device_once_per_log_interval(tmp_path):
    from dkp_core.losses import make_reconstruction_loss
    from pipeline.stages.teach.run import teach_step

    counter = HostReadCounter()
    with counter:
        res = train(run_dir=tmp_path, model=_autolink(), dataset=RandomFrames(),
                    step_fn=counting_step(teach_step(make_reconstruction_loss("l1ssim")), counter),
                    settings=_settings(), config={"t": 1}, config_hash="t")
    per_step = _loop_reads(counter)
    assert res.steps == STEPS and np.isfinite(res.final_loss)
    assert sum(per_step.values()) <= STEPS // LOG_EVERY, [r for r in counter.project if r.tag is not None]
    assert set(per_step) <= SYNC_STEPS, per_step
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == STEPS // LOG_EVERY


def test_distill_step_with_cached_targets_reads_once_per_log_interval(tmp_path):
    """The cached teacher's targets are read per batch by the collate (CPU indices, one vectorised read) and reach
    the step on the device with the frames: no lookup, no read-back inside the step."""
    from rich.console import Console

    from dkp_core.keypoints.teacher import FrozenTeacher
    from dkp_core.losses import make_reconstruction_loss
    from pipeline.stages.distill.run import distill_step
    from pipeline.stages.distill.teacher_cache import EmbeddingCache, WithTargets, build_embedding_cache

    frames = RandomFrames()
    teacher = FrozenTeacher(_autolink())
    build_embedding_cache(tmp_path / "emb", teacher, frames, "heatmaps", False, torch.device("cpu"),
                          Console(file=io.StringIO()))
    cache = EmbeddingCache(tmp_path / "emb")
    lookups = []
    real_lookup = cache.lookup

    def spy(index, flip):
        lookups.append((index.device.type, len(index)))
        return real_lookup(index, flip)

    cache.lookup = spy
    step = distill_step(make_reconstruction_loss("l1ssim"), lambda b: b["target"], gamma=0.5, layer="heatmaps",
                        flatten="keypoint", keypoint_weight=0.1)
    counter = HostReadCounter()
    with counter:
        train(run_dir=tmp_path / "run", model=_autolink(), dataset=frames, step_fn=counting_step(step, counter),
              settings=_settings(), config={"d": 1}, config_hash="d", collate_fn=WithTargets(cache))
    per_step = _loop_reads(counter)
    assert sum(per_step.values()) <= STEPS // LOG_EVERY and set(per_step) <= SYNC_STEPS, per_step
    assert lookups == [("cpu", 4)] * STEPS  # one read per batch, on CPU indices
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all('"kd_loss"' in r and '"kp_loss"' in r for r in rows)


def test_the_counter_sees_a_read_in_every_step(tmp_path):
    """Not vacuous: a step function that reads its loss back (``float(loss)``) is counted at every step."""
    from dkp_core.losses import make_reconstruction_loss
    from pipeline.stages.teach.run import teach_step

    inner = teach_step(make_reconstruction_loss("l1"))

    def reading_step(model, batch, ctx):
        loss, metrics = inner(model, batch, ctx)
        return loss, {"recon_loss": float(metrics["recon_loss"])}  # the old stages' habit: a sync per step

    counter = HostReadCounter(roots=(str(Path(__file__).parent),))
    with counter:
        train(run_dir=tmp_path, model=_autolink(), dataset=RandomFrames(), step_fn=counting_step(reading_step, counter),
              settings=_settings(steps=4), config={"t": 1}, config_hash="t")
    assert _loop_reads(counter) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_the_stages_read_once_per_log_interval(tiny_store, monkeypatch):
    """teach and distill (cached teacher) on the tiny experiment, 6 steps, a metrics line and a checkpoint every 2
    steps, a picture at the end: 3 reads each, at steps 2, 4 and 6."""
    import pipeline.training as training

    counters = []
    real_train = training.train

    def counted_train(**kw):
        counter = HostReadCounter()
        counters.append(counter)
        kw["step_fn"] = counting_step(kw["step_fn"], counter)
        with counter:
            return real_train(**kw)

    monkeypatch.setattr(training, "train", counted_train)
    every = [f"{s}.{k}={v}" for s in ("teach", "distill") for k, v in
             (("log_every", 2), ("checkpoint_every", 2), ("eval_every", 6), ("steps", 6))]
    tiny_store(every, until="distill")
    assert len(counters) == 2  # teach, distill
    for counter in counters:
        per_step = _loop_reads(counter)
        assert sum(per_step.values()) <= 3 and set(per_step) <= {1, 3, 5}, [
            (r.file, r.line, r.tag) for r in counter.project if r.tag is not None]

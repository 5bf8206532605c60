"""The trainer of ``teach`` and ``distill``: exact resume, atomic checkpoints, DDP, AMP, progress.

What lives here: :mod:`.loop` (:func:`train`, the loop), :mod:`.settings` (:class:`TrainSettings`, the step
function's context and the result), :mod:`.sampling` (seeds and the step sampler), :mod:`.rng` (global RNG
state), :mod:`.runtime` (device, AMP, torchrun, stop signals), :mod:`.log` (metrics.jsonl, progress) and
:mod:`.resume` (checkpoint contents and the resume check), :mod:`.syncs` (counting host reads of tensors).

The caller brings the model, the dataset and a *step function*; this module owns everything that
must be right for a run that lasts days on shared machines:

* **Randomness is a pure function of (seed, step, rank)** — never of how the run was interrupted.
  The sampler's order is a permutation seeded by ``(seed, epoch)``; a sample's augmentation is the
  dataset's business but must be seeded by ``(seed, epoch, index)`` (see :class:`EpochDataset`,
  :func:`sample_generator`); every step gets a fresh ``torch.Generator`` seeded by
  ``(seed, step, rank)`` for masks, and the global python/numpy/torch RNGs are reseeded from the
  same triple before each step so dropout is covered too. Resuming therefore needs only the step
  number, the weights, the optimiser and the scaler, and a resumed CPU run ends bitwise identical
  to an uninterrupted one (tests/faults/test_train_kill.py).
* **Checkpoints** every ``checkpoint_every`` steps, at the end, and on SIGTERM/SIGINT, written by
  :func:`pipeline.store.checkpoint.save_atomic` (tmp + fsync + ``os.replace``); the newest
  ``keep_checkpoints`` are kept. Re-running the same command resumes from the newest one.
* **DDP** when started by ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, nccl on CUDA; the global
  batch is split across ranks, so one rank and N ranks see the same samples per step.

What a step function looks like (the model it receives is DDP-wrapped under torchrun: call it,
do not reach into its submodules for the forward pass, or gradients will not be synchronised)::

    def step_fn(model, batch, ctx):
        recon = model(batch["image"], generator=ctx.generator)
        loss = (recon - batch["image"]).abs().mean()
        return loss, {"l1": loss.detach()}  # a tensor: read once per metrics line, not every step
"""

from pipeline.training.log import METRICS_FILENAME
from pipeline.training.loop import train
from pipeline.training.resume import CHECKPOINT_FORMAT, MODEL_FILENAME, MODEL_FORMAT, config_digest
from pipeline.training.runtime import NonFiniteLossError, TrainingInterrupted, resolve_amp, resolve_device
from pipeline.training.sampling import StepBatchSampler, derive_seed, sample_generator, sample_seed
from pipeline.training.settings import (EpochDataset, StepContext, StepFn, TrainLog, TrainResult, TrainSettings,
                                        lr_factor)

__all__ = ["CHECKPOINT_FORMAT", "METRICS_FILENAME", "MODEL_FILENAME", "MODEL_FORMAT", "EpochDataset",
           "NonFiniteLossError", "StepBatchSampler", "StepContext", "StepFn", "TrainLog", "TrainResult",
           "TrainSettings", "TrainingInterrupted", "config_digest", "derive_seed", "lr_factor", "resolve_amp",
           "resolve_device", "sample_generator", "sample_seed", "train"]

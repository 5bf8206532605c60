"""A tiny model, dataset and step function for the trainer's tests; also a script.

As a script it trains in ``RUN_DIR`` (resuming if a checkpoint is there) and can SIGKILL itself at
an exact point, so fault tests hit the same instant every time:

    python tests/faults/train_toy.py RUN_DIR --steps 40 --kill step:13
    torchrun --standalone --nproc-per-node 2 tests/faults/train_toy.py RUN_DIR --norm group

Kill points: ``step:S`` inside the step function of step S (0-based), after the forward pass;
``save:S`` while saving the checkpoint of step S, after its temporary file was written and
truncated to half (a torn write) but before ``os.replace``; ``saved:S`` right after that
checkpoint was renamed into place, before old ones are pruned. Exit codes: 0 done, the
error's exit code for a DkpError (its message on stderr), -9 when killed.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.store import checkpoint as ckpt_mod  # noqa: E402
from pipeline.errors import DkpError  # noqa: E402
from pipeline.training import StepContext, TrainSettings, sample_generator, train  # noqa: E402

IMAGE = 8


class ToyNet(nn.Module):
    """Conv-norm-ReLU encoder/decoder on (B, 3, 8, 8) images; dropout exercises the global RNG."""

    def __init__(self, *, width: int = 8, norm: str = "batch", dropout: float = 0.1) -> None:
        super().__init__()

        def norm_layer() -> nn.Module:
            return nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(2, width)

        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm_layer(), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, stride=2, padding=1), norm_layer(), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``: (B, 3, 8, 8)."""
        h = self.dropout(self.encoder(x))  # (B, width, 4, 4)
        return self.decoder(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, 3, 8, 8)


class ToyDataset:
    """``n`` fixed random images; ``get`` adds a flip and noise seeded by (seed, epoch, index)."""

    def __init__(self, *, n: int = 24, seed: int = 0) -> None:
        self.seed = seed
        self.images = torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1234)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, epoch: int) -> dict[str, torch.Tensor]:
        g = sample_generator(self.seed, epoch, index)
        img = self.images[index]
        if torch.rand((), generator=g) < 0.5:
            img = img.flip(-1)
        img = img + 0.05 * torch.randn(img.shape, generator=g)
        return {"image": img, "index": torch.tensor(index)}


def toy_step(model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext, *,
             mask_ratio: float = 0.3) -> tuple[torch.Tensor, dict]:
    """Masked reconstruction: the mask comes from ctx.generator, dropout from the global RNG."""
    image = batch["image"]
    noise = torch.rand(image.shape[0], 1, IMAGE, IMAGE, generator=ctx.generator, device=ctx.device)
    keep = (noise >= mask_ratio).float()  # (B, 1, 8, 8); all ones when mask_ratio == 0
    recon = model(image * keep)
    loss = F.mse_loss(recon, image)
    return loss, {"masked_frac": 1 - keep.mean()}  # a device tensor: read once per metrics line


def toy_settings(**overrides) -> TrainSettings:
    base = dict(steps=40, batch_size=4, lr=1e-2, weight_decay=1e-3, seed=7, amp="off", checkpoint_every=5,
                log_every=3, eval_every=0, num_workers=0, device="cpu")
    base.update(overrides)
    return TrainSettings(**base)


def _install_kill(spec: str) -> tuple[str, int]:
    kind, _, at = spec.partition(":")
    step = int(at)
    if kind in ("save", "saved"):
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if Path(dst).name == ckpt_mod.checkpoint_name(step):
                if kind == "save":
                    size = os.path.getsize(src)
                    with open(src, "r+b") as f:
                        f.truncate(size // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst, *a, **kw)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **kw)

        ckpt_mod.os.replace = replace  # this process only; it is about to die anyway
    elif kind != "step":
        raise SystemExit(f"unknown kill point {spec!r}")
    return kind, step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--norm", choices=["batch", "group"], default="batch")
    ap.add_argument("--config-hash", default="toy-config")
    ap.add_argument("--plain", action="store_true",
                    help="no dropout, no mask: per-rank randomness would otherwise differ from one rank's")
    ap.add_argument("--kill", default=None, help="step:S | save:S | saved:S")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to give a signal time to land")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (tests/test_gpu.py: cuda)")
    ap.add_argument("--amp", default="off", help="off | bf16 | fp16 | auto")
    ap.add_argument("--after-depth-group", action="store_true",
                    help="under torchrun, first do what the depth stage of `run` does: join the process group and "
                         "wait at a barrier on its 48-hour gloo group, then train")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # same float reduction order in every process of a comparison
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's lines (DDP backend, steps)
    kill_kind, kill_step = _install_kill(args.kill) if args.kill else (None, -1)

    def step_fn(model, batch, ctx):
        out = toy_step(model, batch, ctx, mask_ratio=0.0 if args.plain else 0.3)
        if kill_kind == "step" and ctx.step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.sleep:
            time.sleep(args.sleep)
        return out

    if args.after_depth_group and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from pipeline.stages.depth.stage import _init_distributed

        barrier_group = _init_distributed(int(os.environ["WORLD_SIZE"]))
        dist.barrier(group=barrier_group)
        dist.destroy_process_group(barrier_group)
    torch.manual_seed(0)  # initial weights; the trainer seeds everything after this itself
    model = ToyNet(norm=args.norm, dropout=0.0 if args.plain else 0.1)
    settings = toy_settings(steps=args.steps, batch_size=args.batch, checkpoint_every=args.ckpt_every,
                            log_every=args.log_every, num_workers=args.workers, device=args.device, amp=args.amp)
    try:
        train(run_dir=args.run_dir, model=model, dataset=ToyDataset(n=args.n, seed=settings.seed), step_fn=step_fn,
              settings=settings, config={"toy": True, "norm": args.norm}, config_hash=args.config_hash,
              model_args={"width": 8, "norm": args.norm})
    except DkpError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

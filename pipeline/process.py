"""Where this process stands in a job: its rank, local rank and the world size, read from torchrun's environment
here and nowhere else (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``; a plain run is rank 0 of 1).

Import-light (no torch): the runner, the CLI and the manifest build ask it before any training code is loaded. A
stage gets it once, as ``ctx.process`` (pipeline/execute.py); the trainer's process group
(pipeline/training/runtime.py) is set up from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Process:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1  # the ranks on this machine (they share its cores)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that publishes artifacts, writes pictures and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Started by torchrun with more than one process."""
        return self.world > 1


def this_process() -> Process:
    """This process's place in its job, from torchrun's environment (read each call: tests set it)."""
    env = os.environ
    return Process(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
                   world=int(env.get("WORLD_SIZE", "1")), local_world=int(env.get("LOCAL_WORLD_SIZE", "1")))

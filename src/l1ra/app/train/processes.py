"""`l1ra train` in several processes (`torchrun`, `accelerate launch`): every process trains and evaluates (the
Trainer's DDP and gathered evaluation), process 0 alone checks and clears the output folder, writes the config,
metrics, rank history, plots and adapter, and prints; the others wait for it where they must.

One process (no `WORLD_SIZE`, or 1) is the plain case: `Processes` then does nothing.
"""

from __future__ import annotations

import os

from .monitor import Recorder, RunCallback


class Processes:
    """This process's place in the run (from the launcher's `RANK` / `WORLD_SIZE`) and a barrier."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            from accelerate import PartialState

            # joins the process group the launcher set up (gloo on CPU, NCCL on CUDA) before the Trainer exists, so
            # that the folder checks can wait for process 0; the Trainer's arguments then use the same group
            PartialState(cpu=device == "cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Every process waits here until all have arrived (no-op in one process)."""
        if self.world <= 1:
            return
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def log(self, log):
        """`log` on process 0, silence elsewhere (start-up lines print once)."""
        return log if self.main else (lambda message: None)


class FollowerRecorder(Recorder):
    """The recorder of a process other than 0: keeps the curves in memory, writes nothing."""

    def flush(self, model=None) -> None:
        pass


class FollowerCallback(RunCallback):
    """`RunCallback` of a process other than 0: the same non-finite guard and stop decisions (every process sees the
    same gathered loss and the same synchronised parameters), no progress lines, no rank history written."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.close()  # no progress lines from this process

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import l1ra

        self.n_events = len(l1ra.rank_history(model).events)  # process 0 writes rank_history.json
        return super().on_step_end(args, state, control, model=model, **kwargs)

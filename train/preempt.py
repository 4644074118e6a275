"""Stopping on request: a preempted or time-limited job ends at a step boundary with last.ckpt written.

SLURM asks a job to stop ahead of its walltime (`#SBATCH --signal`) or on preemption with SIGTERM;
torchrun relays SIGTERM to every rank's process group and SIGKILLs them `--shutdown-timeout`
seconds later (30 s by default; scripts/slurm/train.sbatch raises it). The handler only raises a flag:
the trainer folds it into the step's all-reduce, so all ranks stop after the same step, write the
same checkpoint together and exit with `EXIT_PREEMPTED`, the code the sbatch template requeues on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from topoflow.errors import TopoFlowError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL (BSD sysexits): "temporary failure, try again"


class Preempted(TopoFlowError):
    """The run stopped on a stop signal after a finished step, with last.ckpt written: rerun with --resume."""


class StopRequest:
    """A flag raised by SIGTERM/SIGUSR1 while `listening()`; read by the training loop between steps."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _raise_flag(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal API
        self.signal = signal.Signals(signum)  # nothing else: logging here could re-enter a held handler lock

    @contextlib.contextmanager
    def listening(self) -> Iterator[StopRequest]:
        """Catch the stop signals for the duration (main thread only: Python delivers signals there);
        the previous handlers come back afterwards, so a stop between two fits of an ablation still ends
        the process the default way, which loses nothing: each fit has written its last.ckpt."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._raise_flag) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Loader workers ignore the stop signals sent to the whole process group: their rank decides when to
    stop and shuts them down (a worker dead of SIGTERM would fail the rank's last step instead)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_message(step: int, received: signal.Signals | None) -> str:
    """What a stopped run tells the user (and the batch log): where it stopped and how to go on."""
    cause = received.name if received is not None else "a stop signal on another rank"
    return (f"stopped on {cause} after step {step}: last.ckpt is written; "
            f"rerun with --resume to continue (exit code {EXIT_PREEMPTED} asks scripts/slurm/train.sbatch to requeue)")

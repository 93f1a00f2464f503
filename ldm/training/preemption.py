"""Stopping a training run on a signal without losing it: SIGTERM (SLURM, Kubernetes, `kill`),
SIGINT (Ctrl-C) or SIGUSR1 (SLURM's `--signal=USR1@<seconds>`) asks the trainer to finish the
optimizer step in progress, save a checkpoint and exit with 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT), so the job's status says "interrupted", not "failed".

The handler only records the request; the loop acts on it between steps, after every process has
agreed on it (`StopOnSignal.agreed`), because a process that left while the others waited in a
collective would hang them. A second signal stops the process at once, without saving, for a user
who does not want to wait. Signals within `SAME_REQUEST_SECONDS` of the first are the same request:
`accelerate launch` (torchrun) forwards the Ctrl-C it receives to its workers, which the terminal
has already sent it to.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
SAME_REQUEST_SECONDS = 1.0


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal after saving a checkpoint; its code is 128 + the signal's number."""


class StopOnSignal:
    """While entered, the stop signals are recorded instead of ending the process."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signal: signal.Signals | None = None
        self.received_at = 0.0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        # Python lets only the main thread set handlers; a trainer run from another thread keeps the defaults.
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.record) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def record(self, number: int, frame) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.received_at = signal.Signals(number), now
            # stderr directly: a logging call inside a signal handler can deadlock on the handler's lock
            print(f"\n{signal.Signals(number).name}: finishing this step, then saving a checkpoint and "
                  "exiting; send it again to stop at once without saving", file=sys.stderr, flush=True)
        elif now - self.received_at > SAME_REQUEST_SECONDS:
            print(f"\n{signal.Signals(number).name} again: stopping now, without saving", file=sys.stderr,
                  flush=True)
            os._exit(128 + number)

    @property
    def requested(self) -> bool:
        """Whether this process has received a stop signal."""
        return self.signal is not None

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process has received a stop signal. Every process calls it after every
        optimizer step, so all of them stop after the same one."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())

    @property
    def exit_code(self) -> int:
        """128 + the signal's number; SIGTERM's (143) where only another process received one."""
        return 128 + (self.signal or signal.SIGTERM)

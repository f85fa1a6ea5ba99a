"""Graceful stop on SIGTERM / SIGINT: finish the current step, save a checkpoint, exit non-zero.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some seconds before they kill; Ctrl-C sends SIGINT.
The first signal only sets a flag that the train loop reads once per step (ranks agree on it through
``Runtime.any_rank``, so every rank stops after the same step); the loop then saves and raises
``TrainingInterrupted``, which run.py turns into exit status 128 + signal number (143 for SIGTERM, 130 for SIGINT).
A second signal means "now": the process exits at once, without saving (the previous checkpoint stays usable,
because every checkpoint is written atomically). A repeat within REPEAT_WINDOW_S of the first is not a second
request: launchers (torchrun, Slurm) forward the signal a terminal or scheduler already sent to every process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Optional

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0


def exit_status(signum: int) -> int:
    """The shell convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(Exception):
    """Training stopped on request after a checkpoint was saved; ``exit_code`` is what run.py returns."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_status(signum)


class GracefulStop:
    """Context manager: while active, SIGTERM and SIGINT set ``requested`` (a second one exits at once).

    Handlers can only be installed from the main thread; elsewhere this is inert (signals keep their default
    behaviour). The previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None and time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the same request, forwarded by a launcher
        if self.signum is not None:
            # os.write, not logging: a handler may run while a logging lock is held.
            os.write(2, f"\n{signal_name(signum)} again: exiting now without saving (the last complete "
                        "checkpoint is kept)\n".encode())
            os._exit(exit_status(signum))
        self.signum, self._first_at = signum, time.monotonic()
        os.write(2, f"\n{signal_name(signum)} received: finishing the current step, then saving a checkpoint and "
                    "stopping (send it again to exit at once)\n".encode())

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: SIGTERM/SIGINT keep their default behaviour")
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


__all__ = ["GracefulStop", "STOP_SIGNALS", "TrainingInterrupted", "exit_status", "signal_name"]

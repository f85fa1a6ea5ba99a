"""`run.py` that sends itself a signal during one optimizer step, for tests/test_resume.py.

`python signal_at_step.py CONFIG [run.py args]`, launched like run.py (also under accelerate). The environment
variable KONTEXT_TEST_SIGNAL = "RANK:STEP:SIGNAL" (e.g. "1:3:SIGTERM") makes rank RANK signal itself as its optimizer
step STEP starts; every other rank trains normally. Test-only: production code has no such hook.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import run  # noqa: E402
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess  # noqa: E402


def install(spec: str) -> None:
    rank, step, name = spec.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    original = BaseSDTrainProcess.optimizer_step
    started = {"steps": 0}

    def optimizer_step(self, ctx):
        started["steps"] += 1
        if started["steps"] == int(step):
            os.kill(os.getpid(), getattr(signal, name))
        return original(self, ctx)

    BaseSDTrainProcess.optimizer_step = optimizer_step


if __name__ == "__main__":
    install(os.environ["KONTEXT_TEST_SIGNAL"])
    sys.exit(run.main(sys.argv[1:]))

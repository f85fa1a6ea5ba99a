"""`run.py` that pauses at a chosen point so a test can SIGKILL it there, provably, for tests/test_kill.py.

`python pause_at.py CONFIG [run.py args]`. KONTEXT_TEST_PAUSE = "POINT:N" pauses at the N-th time this process
reaches POINT; it then creates the file KONTEXT_TEST_PAUSE_MARKER and sleeps until killed. Points:

  step    inside an optimizer step (during the loss of its first micro-batch)
  save    inside a training state write: every file is in the temporary folder, COMPLETE is not written yet
  prune   inside pruning: an old state has been renamed aside and is about to be deleted
  sample  inside sample generation

Test-only: the trainer has no such hook; this script patches it, like tests/dist_scripts/run_with_probes.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import run  # noqa: E402
from extensions.flux_kontext.model import FluxKontext  # noqa: E402
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess  # noqa: E402
from toolkit.state import atomic, train_state  # noqa: E402


def install(spec: str, marker: Path) -> None:
    point, count = spec.split(":")
    reached = {"n": 0}

    def maybe_pause(here: str) -> None:
        if here != point:
            return
        reached["n"] += 1
        if reached["n"] == int(count):
            marker.write_text(here, encoding="utf-8")
            while True:  # until SIGKILL
                time.sleep(1)

    original_loss, original_write = BaseSDTrainProcess.compute_loss, atomic.atomic_write_bytes
    original_rmtree, original_sample = train_state.shutil.rmtree, FluxKontext.sample

    def compute_loss(self, ctx, batch):
        maybe_pause("step")
        return original_loss(self, ctx, batch)

    def atomic_write_bytes(path, data):
        if Path(path).name == train_state.COMPLETE:
            maybe_pause("save")
        return original_write(path, data)

    def rmtree(path, *args, **kwargs):
        if Path(path).name.endswith(".old") and Path(path).parent.name == train_state.STATE_DIR:
            maybe_pause("prune")
        return original_rmtree(path, *args, **kwargs)

    def sample(self, requests, controls, **kwargs):
        maybe_pause("sample")
        return original_sample(self, requests, controls, **kwargs)

    BaseSDTrainProcess.compute_loss = compute_loss
    atomic.atomic_write_bytes = atomic_write_bytes
    train_state.shutil.rmtree = rmtree  # shutil is shared: only a state's renamed-aside folder pauses
    FluxKontext.sample = sample


if __name__ == "__main__":
    install(os.environ["KONTEXT_TEST_PAUSE"], Path(os.environ["KONTEXT_TEST_PAUSE_MARKER"]))
    sys.exit(run.main(sys.argv[1:]))

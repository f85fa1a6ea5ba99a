"""`run.py` with test-only probes, for tests/test_distributed.py: `python run_with_probes.py CONFIG [run.py args]`.

Launch it under accelerate exactly like run.py. The probes are switched on by environment variables and live only
here (production code has no test hooks); each patches the trainer class before run.main builds it:

KONTEXT_TEST_PROBE_DIR   every rank writes probe_rank<R>.json there: world size; per micro-batch the dataset item
                         indices and files, image shape, whether it had a mask and a control image, epoch and timesteps it trained on; its own loss per step; the files it
                         wrote itself (LoRA, training state, config copy, sample sheets); the sample prompts it rendered; whether
                         it had a progress bar and a TensorBoard writer; and the sha256 of its LoRA tensors at the
                         final save.
KONTEXT_TEST_FAIL        "RANK:STEP:MODE": rank RANK fails as its STEP-th optimizer step starts; MODE `raise` raises a
                         RuntimeError, `kill` SIGKILLs the process (no Python cleanup at all), `lose_states` deletes
                         the run folder's training states (a node's disk lost) and raises, `stall` sleeps
                         forever (train.ddp_timeout_seconds must end the run); `nan` makes that one
                         step's loss NaN on that rank only, `nan_on` every step's from STEP on (the guard's tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import run  # noqa: E402
from extensions.flux_kontext.model import FluxKontext  # noqa: E402
from jobs.process import BaseSDTrainProcess as trainer_module  # noqa: E402
from jobs.process.outputs import RunOutputs  # noqa: E402
from toolkit.train import flow_matching  # noqa: E402
from toolkit.adapters.lora import lora_state_dict  # noqa: E402
from toolkit.state.train_state import state_root  # noqa: E402

Trainer = trainer_module.BaseSDTrainProcess


def lora_digest(transformer) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(lora_state_dict(transformer).items()):
        digest.update(key.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def install_probes(probe_dir: Path) -> None:
    record = {"micro_batches": [], "losses": [], "writes": [], "rendered": []}

    def dump() -> None:
        # Rank and world size are read now: a Ray worker gets them after the probes are installed.
        record.update(rank=rank(), world_size=int(os.environ.get("WORLD_SIZE", "1")))
        (probe_dir / f"probe_rank{rank()}.json").write_text(json.dumps(record), encoding="utf-8")

    original_loss = Trainer.compute_loss
    original_timesteps = flow_matching.sample_timesteps
    original_final = RunOutputs.save_final
    original_step = Trainer.optimizer_step
    original_save = RunOutputs._save
    original_prepare = RunOutputs.prepare
    original_samples = RunOutputs.write_samples
    original_state = getattr(RunOutputs, "save_state", None)  # training states, where the trainer saves them
    original_sample = FluxKontext.sample

    class Monitor(trainer_module.TrainingMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record["progress_bar"] = self.bar is not None
            record["tensorboard"] = self.writer is not None

    def compute_loss(self, ctx, batch):
        record["micro_batches"].append({"index": [int(i) for i in batch["index"]], "path": list(batch["path"]),
                                        "shape": list(batch["target"].shape[-2:]), "epoch": ctx.sampler.epoch,
                                        "mask": "mask" in batch, "control": "control" in batch})
        return original_loss(self, ctx, batch)

    def sample_timesteps(*args, **kwargs):
        t, weights = original_timesteps(*args, **kwargs)
        record["micro_batches"][-1]["t"] = [float(v) for v in t]
        return t, weights

    def optimizer_step(self, ctx):
        result = original_step(self, ctx)
        record["losses"].append(float(result.loss))
        return result

    def save(self, path, *args, **kwargs):
        record["writes"].append(f"lora:{Path(path).name}")
        return original_save(self, path, *args, **kwargs)

    def prepare(self, *args, **kwargs):
        record["writes"].append("config")
        return original_prepare(self, *args, **kwargs)

    def save_state(self, step, *args, **kwargs):
        record["writes"].append(f"state:{step}")
        return original_state(self, step, *args, **kwargs)

    def write_samples(self, step, rendered, **kwargs):
        record["writes"].append(f"samples:{step}")
        return original_samples(self, step, rendered, **kwargs)

    def sample(self, requests, controls, **kwargs):
        record["rendered"].extend(r.index for r in requests)
        return original_sample(self, requests, controls, **kwargs)

    def save_final(self, transformer, *args, **kwargs):
        result = original_final(self, transformer, *args, **kwargs)
        record["lora_sha256"] = lora_digest(transformer)
        dump()
        return result

    Trainer.compute_loss = compute_loss
    flow_matching.sample_timesteps = sample_timesteps
    RunOutputs.save_final = save_final
    Trainer.optimizer_step = optimizer_step
    RunOutputs._save = save
    RunOutputs.prepare = prepare
    RunOutputs.write_samples = write_samples
    if original_state is not None:
        RunOutputs.save_state = save_state
    FluxKontext.sample = sample
    trainer_module.TrainingMonitor = Monitor


def install_fault(spec: str) -> None:
    fail_rank, fail_step, mode = spec.split(":")
    original_step = Trainer.optimizer_step
    original_loss = Trainer.compute_loss
    steps = {"started": 0}

    def compute_loss(self, ctx, batch):
        loss = original_loss(self, ctx, batch)
        poisoned = rank() == int(fail_rank) and (steps["started"] == int(fail_step) if mode == "nan"
                                                 else steps["started"] >= int(fail_step))
        return loss * float("nan") if poisoned else loss

    if mode in ("nan", "nan_on"):
        Trainer.compute_loss = compute_loss

    def optimizer_step(self, ctx):
        steps["started"] += 1
        if mode in ("nan", "nan_on"):
            return original_step(self, ctx)
        if rank() == int(fail_rank) and steps["started"] == int(fail_step):  # rank read late, as in the probes
            sys.stderr.write(f"test fault: rank {rank()} fails at step {fail_step} ({mode})\n")
            sys.stderr.flush()
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "stall":  # a hung rank (driver, NFS, deadlock): alive but never reaching the all-reduce
                while True:
                    time.sleep(1)
            if mode == "lose_states":
                shutil.rmtree(state_root(ctx.outputs.folder))
            raise RuntimeError(f"injected failure on rank {rank()} at step {fail_step}")
        return original_step(self, ctx)

    Trainer.optimizer_step = optimizer_step


def install_from_env() -> None:
    """The probes and faults the environment asks for; also a Ray `worker_process_setup_hook` (tests/test_ray.py)."""
    if os.environ.get("KONTEXT_TEST_PROBE_DIR"):
        install_probes(Path(os.environ["KONTEXT_TEST_PROBE_DIR"]))
    if os.environ.get("KONTEXT_TEST_FAIL"):
        install_fault(os.environ["KONTEXT_TEST_FAIL"])


if __name__ == "__main__":
    install_from_env()
    sys.exit(run.main(sys.argv[1:]))

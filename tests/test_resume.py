"""Exact resume and crash safety: a killed run resumes to the same LoRA, bit for bit; stop signals save first.

Real kills need real processes (`python run.py CONFIG`, ~6 s to start each); everything that does not is run
in-process through run.main. The kill points are drawn from a seeded RNG: what the tests assert is deterministic,
the exact instant of each kill is not (and need not be).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run
from tests.helpers import REPO, assert_same_tensors, merge, tiny_config_dict, write_config
from tests.launch import accelerate_launch, clean_env
from toolkit.state import train_state
from toolkit.state.train_state import check_state, find_latest_state, list_states, read_info

START_TIMEOUT_S = 180  # model load on a loaded CI runner; a healthy tiny run starts in ~6 s


def _config(folder: Path, model_dir: Path, data_dir: Path, name: str = "tiny", **overrides) -> Path:
    """12 steps of batch 1 over 8 pairs (so resumes land in epoch 0 and 1), a state every step, LoRA dropout (so
    the global RNG matters) and a sample every 5 steps (which must not disturb any RNG of training)."""
    base = {"train.steps": 12, "train.batch_size": 1, "save.save_every": 1, "save.max_step_saves_to_keep": 2,
            "network.dropout": 0.1, "sample.sample_every": 5}
    cfg = merge(tiny_config_dict(folder / "out", model_dir, data_dir, name=name), {**base, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / f"{name}.yaml", cfg)


def _start(config: Path, log: Path, *args: str) -> subprocess.Popen:
    # The same thread count as this process (conftest caps it), so runs here and there do the same float math.
    threads = str(torch.get_num_threads())
    handle = log.open("w", encoding="utf-8")
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), str(config), *args], cwd=REPO,
                            env=clean_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads),
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _run(config: Path, log: Path, *args: str) -> int:
    proc = _start(config, log, *args)
    return proc.wait(timeout=START_TIMEOUT_S + 120)


def _newest_step(run_dir: Path) -> int:
    states = list_states(run_dir)
    return states[-1][0] if states else 0


def _wait_until(predicate, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> bool:
    """Poll `predicate` until true (True) or until the process ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the training run made no progress in time")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _assert_nothing_partial(run_dir: Path) -> None:
    """Whatever the kill interrupted, every state under a final name is complete and every LoRA file loads."""
    for _, path in list_states(run_dir):
        assert check_state(path) is None, path
    for lora in run_dir.glob("*.safetensors"):
        assert load_file(str(lora)), lora


FINISHED = {"save.save_every": 2, "save.max_step_saves_to_keep": 10}


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """An uninterrupted in-process run of 12 steps with a kept state every 2 steps: the reference LoRA of every
    single-process test (read-only: tests copy it)."""
    folder = tmp_path_factory.mktemp("finished")
    assert run.main([str(_config(folder, tiny_model_dir, demo_data_dir, **FINISHED))]) == 0
    logging.getLogger().handlers.clear()
    return folder / "out" / "tiny"


@pytest.fixture
def finished_run(pristine_run, tmp_path):
    """A copy of pristine_run at tmp_path/ref/out/tiny (configs written by _config(tmp_path / "ref") use it)."""
    copy = tmp_path / "ref" / "out" / "tiny"
    shutil.copytree(pristine_run, copy)
    return copy


# SIGKILL at chosen points (mid-step, mid-save, mid-prune, mid-sampling): tests/test_kill.py.


def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path, tiny_model_dir, demo_data_dir):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 5000, "save.save_every": 4000})
    run_dir = tmp_path / "out" / "tiny"
    log = tmp_path / "run.log"
    proc = _start(config, log)
    assert _wait_until(lambda: "loss=" in log.read_text(encoding="utf-8"), proc), log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    text = log.read_text(encoding="utf-8")
    match = re.search(r"stopped by SIGTERM after step (\d+) of 5000; checkpoint saved in (\S+)", text)
    assert match, text[-3000:]
    step = int(match.group(1))
    state = run_dir / "state" / f"{step:09d}"
    assert match.group(2).rstrip(";") == str(state)
    assert check_state(state) is None and read_info(state)["step"] == step
    assert (run_dir / f"tiny_{step:09d}.safetensors").is_file()
    assert not (run_dir / "tiny.safetensors").exists()


def test_sigint_during_training_stops_with_130_and_resumes_exactly(pristine_run, tmp_path, tiny_model_dir,
                                                                     demo_data_dir, monkeypatch):
    """SIGINT (Ctrl-C) at step 5 of an in-process run: exit 130, state 5 saved; the next run ends where an
    uninterrupted one does."""
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess

    config = _config(tmp_path / "int", tiny_model_dir, demo_data_dir, **{"save.save_every": 4})
    original = BaseSDTrainProcess.optimizer_step
    calls = {"n": 0}

    def interrupted_step(self, ctx):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still completes
        return original(self, ctx)

    monkeypatch.setattr(BaseSDTrainProcess, "optimizer_step", interrupted_step)
    assert run.main([str(config)]) == 130
    run_dir = tmp_path / "int" / "out" / "tiny"
    assert [step for step, _ in list_states(run_dir)] == [4, 5]
    monkeypatch.setattr(BaseSDTrainProcess, "optimizer_step", original)
    assert run.main([str(config)]) == 0
    assert_same_tensors(pristine_run / "tiny.safetensors", run_dir / "tiny.safetensors")


def test_second_signal_exits_at_once(tmp_path):
    """A repeat within a second (a launcher forwarding the same Ctrl-C) is the same request; a later one exits."""
    script = ("import os, signal, time\nfrom toolkit.train.signals import GracefulStop\nwith GracefulStop() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n    assert stop.requested\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(1.2)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert "SIGINT again: exiting now" in proc.stderr


def test_damaged_newest_state_is_skipped_with_a_warning(finished_run, tmp_path, tiny_model_dir, demo_data_dir,
                                                        capsys):
    """State 12 and the final LoRA gone, state 10 truncated, a temporary folder left over: resume from 8."""
    config = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir, **FINISHED)
    run_dir = finished_run
    reference = run_dir.parent / "reference.safetensors"
    shutil.copy(run_dir / "tiny.safetensors", reference)
    (run_dir / "tiny.safetensors").unlink()
    shutil.rmtree(run_dir / "state" / "000000012")
    optimizer = run_dir / "state" / "000000010" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    leftover = run_dir / "state" / ".000000011.x1.tmp"
    leftover.mkdir()
    (leftover / "lora.safetensors").write_bytes(b"partial")
    assert run.main([str(config)]) == 0
    err = capsys.readouterr().err
    assert f"training state {run_dir / 'state' / '000000010'} is unusable" in err
    assert f"resuming from {run_dir / 'state' / '000000008'}:" in err
    assert not leftover.exists()
    assert_same_tensors(reference, run_dir / "tiny.safetensors")


def test_prepared_loader_resumes_mid_epoch_1(finished_run, pristine_run, tmp_path, tiny_model_dir, demo_data_dir):
    """distributed_training on with 1 process: accelerate's prepared loader resets its sampler's epoch on every pass
    unless told (toolkit/data/sampler.py); the resume from step 10 (epoch 1, batch 2) must still be exact."""
    config = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir,
                     **{**FINISHED, "train.distributed_training": True})
    (finished_run / "tiny.safetensors").unlink()
    shutil.rmtree(finished_run / "state" / "000000012")
    assert read_info(finished_run / "state" / "000000010")["epoch"] == 1
    assert run.main([str(config)]) == 0
    assert_same_tensors(pristine_run / "tiny.safetensors", finished_run / "tiny.safetensors")


def test_resume_from_a_state_folder(finished_run, tmp_path, tiny_model_dir, demo_data_dir, capsys):
    state = finished_run / "state" / "000000004"
    config = _config(tmp_path / "other", tiny_model_dir, demo_data_dir, name="other",
                     **{"save.save_every": 2, "train.resume_from": str(state)})
    assert run.main([str(config)]) == 0
    assert f"resuming from {state}: step 4 of 12" in capsys.readouterr().err
    assert_same_tensors(finished_run / "tiny.safetensors", tmp_path / "other" / "out" / "other" / "other.safetensors")
    # Once the run has states of its own, the same command continues them (here: it is finished) instead of
    # starting from resume_from again.
    assert run.main([str(config)]) == 0
    assert "is not used: this run has training states of its own" in capsys.readouterr().err


def test_resume_from_something_that_is_not_a_state_is_an_error(tmp_path, tiny_model_dir, demo_data_dir, capsys):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.resume_from": str(tmp_path)})
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert f"train.resume_from: {tmp_path} is not a usable training state (no COMPLETE marker" in err


def test_changed_config_is_an_error_that_says_what_to_do(finished_run, tmp_path, tiny_model_dir, demo_data_dir,
                                                         capsys):
    changed = {**FINISHED, "train.lr": 2e-3}
    config = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir, **changed)
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "the config changed since the training state" in err and "train.lr: 0.001 -> 0.002" in err
    assert "--fresh" in err and "train.resume_from: latest" in err
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()} == before

    # Keys that do not change training (sampling, logging, rotation) are not part of the hash.
    same = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir,
                   **{"save.save_every": 3, "save.max_step_saves_to_keep": 1, "log_every": 5})
    assert run.main([str(same)]) == 0
    assert "is already trained (12 steps" in capsys.readouterr().err

    # Forcing with resume_from: latest continues the run with the new config (here: 2 more steps).
    longer = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir,
                     **{**FINISHED, "train.steps": 14, "train.resume_from": "latest"})
    assert run.main([str(longer)]) == 0
    assert "train.steps: 12 -> 14" in capsys.readouterr().err
    assert read_info(find_latest_state(finished_run))["step"] == 14


def test_fresh_starts_a_new_versioned_folder_and_keeps_the_old_one(finished_run, tmp_path, tiny_model_dir,
                                                                   demo_data_dir):
    config = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir,
                     **{"train.steps": 3, "save.save_every": 2})
    old = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert run.main([str(config), "--fresh"]) == 0
    v2 = finished_run.parent / "tiny_v2"
    assert (v2 / "tiny_v2.safetensors").is_file() and read_info(find_latest_state(v2))["step"] == 3
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == old
    assert run.main([str(config), "--fresh"]) == 0
    assert (finished_run.parent / "tiny_v3" / "tiny_v3.safetensors").is_file()
    # Without --fresh the newest version is the run: already trained, nothing to do.
    assert run.main([str(config)]) == 0
    assert sorted(p.name for p in finished_run.parent.iterdir()) == ["tiny", "tiny_v2", "tiny_v3"]


def test_gradient_accumulation_resumes_at_the_right_micro_batch(tmp_path, tiny_model_dir, demo_data_dir):
    """3 micro-batches per step over 8 batches per epoch: the state of step 3 sits at epoch 1, batch 1."""
    overrides = {"train.steps": 4, "train.gradient_accumulation_steps": 3, "save.save_every": 3}
    reference = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir, **overrides)
    assert run.main([str(reference)]) == 0
    state = tmp_path / "ref" / "out" / "tiny" / "state" / "000000003"
    info = read_info(state)
    assert (info["consumed_batches"], info["epoch"], info["batches_done"]) == (9, 1, 1)
    config = _config(tmp_path / "acc", tiny_model_dir, demo_data_dir, **overrides, **{"train.resume_from": str(state)})
    assert run.main([str(config)]) == 0
    assert_same_tensors(tmp_path / "ref" / "out" / "tiny" / "tiny.safetensors",
                  tmp_path / "acc" / "out" / "tiny" / "tiny.safetensors")


# -- two processes ------------------------------------------------------------------------------------------------
def _launch_two(script: Path, config: Path, log: Path, **env: str) -> int:
    """Real 2-process gloo data parallelism on CPU (tests/launch.py); the output goes to `log`."""
    proc = accelerate_launch(script, config, env=env, timeout=600)
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    return proc.returncode


@pytest.mark.distributed
def test_two_processes_stop_together_and_resume_to_the_same_lora(tmp_path, tiny_model_dir, demo_data_dir, capsys):
    """SIGTERM reaches rank 1 only, during step 3: both ranks stop after step 3 (agreed by all-reduce), each rank's
    RNGs are saved; resuming with 2 processes gives the uninterrupted run's LoRA, with 1 process a warning."""
    overrides = {"train.steps": 8, "save.save_every": 4, "train.distributed_training": True}
    reference = _config(tmp_path / "ref", tiny_model_dir, demo_data_dir, **overrides)
    log = tmp_path / "ref.log"
    assert _launch_two(REPO / "run.py", reference, log) == 0, log.read_text()

    config = _config(tmp_path / "stop", tiny_model_dir, demo_data_dir, **overrides)
    run_dir = tmp_path / "stop" / "out" / "tiny"
    log = tmp_path / "stop.log"
    assert _launch_two(REPO / "tests" / "resume_scripts" / "signal_at_step.py", config, log,
                       KONTEXT_TEST_SIGNAL="1:3:SIGTERM") != 0
    text = log.read_text(encoding="utf-8")
    assert "stopped by SIGTERM after step 3 of 8" in text, text[-4000:]
    assert "stopped by a stop request on another process after step 3 of 8" in text, text[-4000:]
    state = run_dir / "state" / "000000003"
    assert check_state(state) is None and read_info(state)["world_size"] == 2
    ranks = [torch.load(state / f"rng_rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"]), "each rank has its own noise"

    world_one = _config(tmp_path / "one", tiny_model_dir, demo_data_dir, **overrides)
    shutil.copytree(run_dir, tmp_path / "one" / "out" / "tiny")
    log = tmp_path / "resume.log"
    assert _launch_two(REPO / "run.py", config, log) == 0, log.read_text()
    assert f"resuming from {state}: step 3 of 8" in log.read_text(encoding="utf-8")
    assert_same_tensors(tmp_path / "ref" / "out" / "tiny" / "tiny.safetensors", run_dir / "tiny.safetensors")

    assert run.main([str(world_one)]) == 0  # 1 process (distributed_training is not part of the config hash)
    assert "data order and noise differ" in capsys.readouterr().err


def test_out_of_memory_names_the_batch_and_is_raised(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch, capsys):
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess

    def out_of_memory(self, ctx, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(BaseSDTrainProcess, "compute_loss", out_of_memory)
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 2})
    assert run.main([str(config)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"out of memory on a micro-batch of .*target \(1, 3, \d+, \d+\), control \(1, 3, \d+, \d+\), "
                     r".*index \(1,\).*; images: .*/target/pair_00\d\.png", err), err[-3000:]
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB" in err  # re-raised, not hidden


# -- units --------------------------------------------------------------------------------------------------------
def _process_config(tmp_path, model_dir, data_dir, **overrides):
    from toolkit.config.loader import load_job_dict

    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), overrides)
    return load_job_dict(cfg, "test").config.process[0]


def test_config_hash_covers_training_keys_only(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    def digest(**overrides):
        return train_state.config_hash(train_state.training_config(
            _process_config(tmp_path, tiny_model_dir, demo_data_dir, **overrides)))

    base = digest()
    for harmless in ({"sample.sample_every": 5}, {"save.max_step_saves_to_keep": 9}, {"log_every": 3},
                     {"training_folder": str(tmp_path / "elsewhere")}, {"device": "cuda:1"},
                     {"train.resume_from": "latest"}, {"save.dtype": "bf16"}):
        assert digest(**harmless) == base, harmless
    for changing in ({"train.lr": 5e-4}, {"train.seed": 8}, {"network.linear": 8}, {"train.batch_size": 1},
                     {"datasets": [{"folder_path": str(tmp_path), "control_path": str(demo_data_dir)}]}):
        assert digest(**changing) != base, changing
    # A token pulled into the config changes nothing and is not stored.
    monkeypatch.setenv("HF_TOKEN", "hf_hashTOKEN12345678")
    cfg = train_state.training_config(_process_config(
        tmp_path, tiny_model_dir, demo_data_dir, **{"trigger_word": "t ${HF_TOKEN}"}))
    assert cfg["trigger_word"] == "t ***"


def test_keep_0_still_keeps_the_newest_state(tmp_path, tiny_model_dir, demo_data_dir):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir,
                     **{"train.steps": 3, "save.max_step_saves_to_keep": 0})
    assert run.main([str(config)]) == 0
    assert [step for step, _ in list_states(tmp_path / "out" / "tiny")] == [3]

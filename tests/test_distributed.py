"""Data-parallel training that really shards and syncs: real 2-process gloo runs on CPU, plus checks needing none.

Each launch costs 10-20 s on 2 cores, so the runs that several tests read are module fixtures. The processes are
started like a user would (`accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=1, or the launcher script);
test-only behaviour (probes, injected faults) lives in tests/dist_scripts, never in the trainer.
Select with `pytest -m distributed`, skip with `pytest -m "not distributed"`.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, assert_same_tensors, merge, tiny_config_dict, write_config
from tests.launch import SCRIPTS, LAUNCHER, FAILURE_BOUND_S, accelerate_launch, run_launcher, explain, ddp_config, read_probes, lora_tensors
from tools.demo_data import build_demo_dataset

# -- data sets ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def six_pairs(tmp_path_factory) -> Path:
    """6 pairs in 3 buckets of 2: with 2 ranks x batch 1 every item is trained exactly once per epoch."""
    return build_demo_dataset(tmp_path_factory.mktemp("six") / "data", num_pairs=6, seed=1)


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("one") / "data", num_pairs=1, seed=2)


@pytest.fixture(scope="module")
def two_square_pairs(tmp_path_factory) -> Path:
    """Exactly 2 pairs, both square (one bucket): the global batch of 2 is the same for 1 and for 2 processes."""
    root = tmp_path_factory.mktemp("two")
    source = build_demo_dataset(root / "source", num_pairs=4, seed=3)  # pairs 0 and 3 are the square ones
    data = root / "data"
    for sub in ("target", "control"):
        (data / sub).mkdir(parents=True)
    for name in ("pair_000", "pair_003"):
        shutil.copy(source / "control" / f"{name}.png", data / "control")
        shutil.copy(source / "target" / f"{name}.png", data / "target")
        shutil.copy(source / "target" / f"{name}.txt", data / "target")
    return data


# -- the shared 2-process runs ------------------------------------------------------------------------------------
PROBE_RUN = {"train.steps": 6, "save.save_every": 3, "sample.sample_every": 6}


def two_prompts(data_dir: Path) -> list[str]:
    return [f"[trigger] invert --ctrl_img {data_dir / 'sample_control' / f'sample_00{i}.png'}" for i in range(2)]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, tiny_model_dir, six_pairs):
    """6 steps, 2 processes, with every rank recording what it trained on and what it wrote."""
    folder = tmp_path_factory.mktemp("probe_run")
    config = ddp_config(folder, tiny_model_dir, six_pairs, "ddp", **PROBE_RUN,
                        **{"sample.prompts": two_prompts(six_pairs)})
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_PROBE_DIR": str(folder)})
    assert proc.returncode == 0, explain(proc)
    return {"proc": proc, "probes": read_probes(folder), "run_dir": folder / "out" / "ddp"}


@pytest.fixture(scope="module")
def launcher_run(tmp_path_factory, tiny_model_dir, six_pairs):
    """The same config as probe_run (another output folder), started by ./run_distributed_training.sh CONFIG 2."""
    folder = tmp_path_factory.mktemp("launcher_run")
    config = ddp_config(folder, tiny_model_dir, six_pairs, "ddp", **PROBE_RUN,
                        **{"sample.prompts": two_prompts(six_pairs)})
    proc = run_launcher(config, 2, env={"OMP_NUM_THREADS": "1"})  # as in probe_run, whatever the core count
    assert proc.returncode == 0, explain(proc)
    return {"proc": proc, "run_dir": folder / "out" / "ddp"}


# -- gradients are synced -----------------------------------------------------------------------------------------
# The recommended multi-GPU recipe: 8-bit base, gradient checkpointing, accumulation (no_sync on the first
# micro-batch across processes), latents and text embeddings cached.
RECIPE = {"model.quantize": True, "train.gradient_checkpointing": True, "train.gradient_accumulation_steps": 2,
          "train.cache_text_embeddings": True}


@pytest.mark.distributed
@pytest.mark.parametrize("adapter, zero_init, recipe", [("lora", ".lora_B.", {}), ("lokr", ".lokr_w1", {}),
                                                        ("lora", ".lora_B.", {**RECIPE, "model.qtype": "qint8"}),
                                                        ("lora", ".lora_B.", {**RECIPE, "model.qtype": "qfloat8"})],
                         ids=["lora", "lokr", "recipe-qint8", "recipe-qfloat8"])
def test_two_processes_batch_1_equal_one_process_batch_2(adapter, zero_init, recipe, tmp_path, tiny_model_dir,
                                                         two_square_pairs):
    """Same two samples, same per-sample noise and timesteps: one SGD step (lr 1, no clipping, so the update of the
    zero-initialised factor (LoRA B, LoKr w1) IS the gradient) gives the same adapter. Without the all-reduce each
    rank would step on half the batch. DDP never holds a frozen base weight or buffer."""
    dataset = {**tiny_config_dict(tmp_path, tiny_model_dir, two_square_pairs)["config"]["process"][0]["datasets"][0],
               "cache_latents": bool(recipe)}
    common = {"sample.prompts": [], "train.optimizer": "sgd", "train.lr": 1.0, "train.max_grad_norm": 0.0,
              "train.steps": 1, "network.type": adapter, "datasets": [dataset], **recipe}
    single = write_config(tmp_path / "single.yaml", merge(
        tiny_config_dict(tmp_path / "out1", tiny_model_dir, two_square_pairs), {**common, "train.batch_size": 2}))
    ddp = ddp_config(tmp_path, tiny_model_dir, two_square_pairs, "ddp", **common)

    # The single process runs in this one (saves an interpreter start); the script is the same.
    runpy.run_path(str(SCRIPTS / "one_step.py"))["main"](str(single), tmp_path / "single.safetensors")
    proc = accelerate_launch(SCRIPTS / "one_step.py", ddp, tmp_path / "ddp.safetensors")
    assert proc.returncode == 0, explain(proc)

    seen_single = json.loads((tmp_path / "single.safetensors.rank0.json").read_text())
    seen = [json.loads((tmp_path / f"ddp.safetensors.rank{r}.json").read_text()) for r in range(2)]
    assert [s["world_size"] for s in seen] == [2, 2]
    assert [(s["ddp"], s["frozen_synced"]) for s in seen] == [("DistributedDataParallel", [])] * 2
    assert seen[0]["index"] + seen[1]["index"] == seen_single["index"]  # rank r trains item r of the global batch
    assert sorted(seen_single["index"]) == [0, 1]

    one, two = lora_tensors(tmp_path / "single.safetensors"), lora_tensors(tmp_path / "ddp.safetensors")
    assert one.keys() == two.keys() and one
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-6, worst
    step = max(one[k].abs().max().item() for k in one if zero_init in k)  # starts at 0: this is the update
    assert step > 1e-3, "the step changed almost nothing: the comparison would prove nothing"


@pytest.mark.distributed
def test_ranks_end_with_identical_lora_and_the_file_holds_it(probe_run):
    ranks = probe_run["probes"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["lora_sha256"] == ranks[1]["lora_sha256"]
    # The ranks trained on different items, so identical weights mean the gradients were all-reduced.
    assert [b["index"] for b in ranks[0]["micro_batches"]] != [b["index"] for b in ranks[1]["micro_batches"]]
    saved = lora_tensors(probe_run["run_dir"] / "ddp.safetensors")
    assert saved and any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)


# -- data sharding ------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_ranks_see_disjoint_single_bucket_shards_covering_each_epoch(probe_run):
    rank0, rank1 = (r["micro_batches"] for r in probe_run["probes"])
    assert len(rank0) == len(rank1) == 6  # 6 steps x 1 micro-batch
    assert all(len(b["index"]) == 1 for b in rank0 + rank1)  # per-process batch 1
    for a, b in zip(rank0, rank1):
        assert a["shape"] == b["shape"], "a global batch mixed buckets"
        assert a["epoch"] == b["epoch"]
    for epoch in (0, 1):  # 6 items, global batch 2: 3 steps per epoch
        mine = [set(b["index"]) for b in rank0 if b["epoch"] == epoch]
        theirs = [set(b["index"]) for b in rank1 if b["epoch"] == epoch]
        seen0, seen1 = set().union(*mine), set().union(*theirs)
        assert len(mine) == 3 and seen0.isdisjoint(seen1)
        assert seen0 | seen1 == set(range(6))


@pytest.mark.distributed
def test_ranks_draw_different_timesteps(probe_run):
    rank0, rank1 = (r["micro_batches"] for r in probe_run["probes"])
    assert all(a["t"] != b["t"] for a, b in zip(rank0, rank1))


# -- one writer, mean loss, the log -------------------------------------------------------------------------------
@pytest.mark.distributed
def test_only_the_main_process_writes_and_sampling_is_split(probe_run):
    rank0, rank1 = probe_run["probes"]
    assert rank1["writes"] == []
    assert {"config", "lora:ddp_000000003.safetensors", "samples:6", "lora:ddp.safetensors"} <= set(rank0["writes"])
    assert (rank0["rendered"], rank1["rendered"]) == ([0], [1])  # two prompts, one per rank
    assert (rank0["progress_bar"], rank0["tensorboard"]) == (True, True)
    assert (rank1["progress_bar"], rank1["tensorboard"]) == (False, False)

    run_dir = probe_run["run_dir"]
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["ddp.safetensors", "ddp_000000003.safetensors"]
    assert {"logs", "samples"} <= {p.name for p in run_dir.iterdir() if p.is_dir()}
    assert len(list((run_dir / "logs").iterdir())) == 1, "one TensorBoard event file, from the main process"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "000000006_00.png", "000000006_01.png", "000000006_sheet.png"]
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.distributed
def test_logged_loss_is_the_mean_over_ranks(probe_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(probe_run["run_dir"] / "logs"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    rank0, rank1 = (r["losses"] for r in probe_run["probes"])
    assert sorted(logged) == list(range(1, 7))  # log_every 1
    for step, value in logged.items():
        assert value == pytest.approx((rank0[step - 1] + rank1[step - 1]) / 2, rel=1e-5)
    assert rank0 != rank1


@pytest.mark.distributed
def test_log_shows_world_size_and_effective_batch(probe_run):
    stderr = probe_run["proc"].stderr
    assert "world size 2 | per-process batch 1 x processes 2 x accumulation 1 = effective batch 2" in stderr
    assert "rank 0: 1 CPU threads (2 local processes)" in stderr
    assert stderr.count("effective batch") == 1, "only the main process logs at INFO"


# -- the launcher -------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_launcher_trains_with_two_cpu_processes(launcher_run):
    stderr = launcher_run["proc"].stderr
    assert "no GPU found: 2 CPU processes over gloo, 1 thread(s) each" in stderr
    assert "world size 2 |" in stderr and "effective batch 2" in stderr
    run_dir = launcher_run["run_dir"]
    assert (run_dir / "ddp.safetensors").is_file() and (run_dir / "samples" / "000000006_sheet.png").is_file()


@pytest.mark.distributed
def test_same_seed_and_world_size_reproduce_the_lora(launcher_run, probe_run):
    """Two launches (the launcher, and accelerate directly with probes) of one config: the same LoRA, bit for bit."""
    first = lora_tensors(probe_run["run_dir"] / "ddp.safetensors")
    second = lora_tensors(launcher_run["run_dir"] / "ddp.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_launcher_help():
    proc = run_launcher("--help", timeout=30)
    assert proc.returncode == 0 and "Usage: ./run_distributed_training.sh CONFIG" in proc.stdout
    proc = run_launcher(timeout=30)
    assert proc.returncode == 2 and "Usage" in proc.stderr


def test_launcher_dry_run_reads_env_file_and_warns_without_the_flag(tmp_path, tiny_model_dir, demo_data_dir):
    """A copy of the launcher next to a .env (the launcher reads the .env beside itself): the environment wins over
    .env, .env over the defaults; a config path is relative to the caller's folder; a config without
    distributed_training gets a warning before anything starts."""
    for name in ("toolkit", "tools", "run.py"):
        (tmp_path / name).symlink_to(REPO / name)
    shutil.copy(LAUNCHER, tmp_path / LAUNCHER.name)
    (tmp_path / ".env").write_text(
        "# NCCL settings\nexport NCCL_P2P_DISABLE=\"1\"\nNCCL_IB_DISABLE=1\n\nNCCL_DEBUG = 'INFO'\nnot a line\n")
    caller = tmp_path / "caller"
    caller.mkdir()
    config = write_config(caller / "single.yaml", tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir))
    proc = run_launcher("single.yaml", 2, "--dry-run", "--main_process_port", "29555",
                        script=tmp_path / LAUNCHER.name, cwd=caller,
                        env={"NCCL_IB_DISABLE": "0", "OMP_NUM_THREADS": "3"}, timeout=60)
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    for expected in ("NCCL_P2P_DISABLE=1", "NCCL_IB_DISABLE=0", "NCCL_DEBUG=INFO", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                     "ACCELERATE_USE_CPU=1", "KONTEXT_EXPECTED_WORLD_SIZE=2", "OMP_NUM_THREADS=3",
                     "KONTEXT_CPU_THREADS=3"):
        assert expected in lines, (expected, proc.stdout)
    command = [line for line in lines if line.startswith("command:")][0]
    assert "--multi_gpu" in command and "--num_processes 2" in command and "--main_process_port 29555" in command
    assert command.count("--main_process_port") == 1 and "--dry-run" not in command
    assert command.endswith(f"run.py {config}")
    assert "train.distributed_training is not true" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
@pytest.mark.parametrize("accelerate_config", ["fsdp.yaml", "deepspeed_zero2.yaml"])
def test_launcher_refuses_fsdp_and_deepspeed_without_gpus(tmp_path, tiny_model_dir, demo_data_dir, accelerate_config):
    """accelerate itself refuses FSDP on CPU ('There are currently no available devices found', accelerate 1.15):
    the launcher says so before starting anything."""
    config = ddp_config(tmp_path, tiny_model_dir, demo_data_dir, "fsdp")
    proc = run_launcher(config, 2, "--config_file", f"config/accelerate/{accelerate_config}", "--dry-run", timeout=60)
    assert proc.returncode == 2, explain(proc)
    assert "asks for FSDP or DeepSpeed, which need GPUs" in proc.stderr


# -- small data, wrong world size, failures -----------------------------------------------------------------------
@pytest.mark.distributed
def test_more_processes_than_pairs_still_trains_with_a_warning(tmp_path, tiny_model_dir, one_pair):
    config = ddp_config(tmp_path, tiny_model_dir, one_pair, "one", **{"train.steps": 2, "sample.prompts": []})
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_PROBE_DIR": str(tmp_path)})
    assert proc.returncode == 0, explain(proc)
    assert "fewer items than the global batch of 2" in proc.stderr
    assert [[b["index"] for b in r["micro_batches"]] for r in read_probes(tmp_path)] == [[[0], [0]], [[0], [0]]]
    assert (tmp_path / "out" / "one" / "one.safetensors").is_file()


@pytest.mark.distributed
def test_world_size_mismatch_stops_with_a_clear_error(tmp_path, tiny_model_dir, one_pair):
    config = ddp_config(tmp_path, tiny_model_dir, one_pair, "guard", **{"sample.prompts": []})
    proc = accelerate_launch(REPO / "run.py", config, env={"KONTEXT_EXPECTED_WORLD_SIZE": "3"})
    assert proc.returncode != 0
    assert "the launcher asked for 3 processes but this process sees a world size of 2" in proc.stderr, explain(proc)
    assert not (tmp_path / "out" / "guard" / "guard.safetensors").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_one_failing_rank_ends_every_rank(tmp_path, tiny_model_dir, demo_data_dir, mode):
    """Rank 1 raises (or is SIGKILLed) at step 2 while rank 0 waits in the gradient all-reduce: the launch must end,
    non-zero, well before the collective timeout, and no final LoRA may appear."""
    config = ddp_config(tmp_path, tiny_model_dir, demo_data_dir, "fail", **{"train.steps": 50, "sample.prompts": []})
    start = time.monotonic()
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_FAIL": f"1:2:{mode}"},
                             timeout=FAILURE_BOUND_S)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, explain(proc)
    assert elapsed < FAILURE_BOUND_S
    assert f"test fault: rank 1 fails at step 2 ({mode})" in proc.stderr
    assert not (tmp_path / "out" / "fail" / "fail.safetensors").exists()


@pytest.mark.distributed
def test_sigkilled_rank_ends_the_run_and_the_relaunch_resumes_bit_identically(probe_run, tmp_path, tiny_model_dir,
                                                                               six_pairs):
    """probe_run's config in another folder; rank 1 is SIGKILLed as step 5 starts (state 3 saved): every rank ends
    within the bound, the launcher reports the signal, and a plain relaunch ends with probe_run's LoRA, bit for bit."""
    config = ddp_config(tmp_path, tiny_model_dir, six_pairs, "ddp", **PROBE_RUN,
                        **{"sample.prompts": two_prompts(six_pairs)})
    start = time.monotonic()
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_FAIL": "1:5:kill"},
                             timeout=FAILURE_BOUND_S)
    assert proc.returncode != 0 and time.monotonic() - start < FAILURE_BOUND_S, explain(proc)
    assert re.search(r"exitcode\s*:\s*-9\b", proc.stderr), explain(proc)  # rank 1 died by SIGKILL
    run_dir = tmp_path / "out" / "ddp"
    assert not (run_dir / "ddp.safetensors").exists()
    proc = accelerate_launch(REPO / "run.py", config)
    assert proc.returncode == 0, explain(proc)
    assert f"resuming from {run_dir / 'state' / '000000003'}: step 3 of 6" in proc.stderr, explain(proc)
    assert_same_tensors(probe_run["run_dir"] / "ddp.safetensors", run_dir / "ddp.safetensors")


# -- no processes needed ------------------------------------------------------------------------------------------
def test_flag_on_with_one_process_trains_exactly_like_flag_off(tmp_path, tiny_model_dir, demo_data_dir):
    """distributed_training: true in a single process goes through accelerate's prepared loader, optimizer and
    scheduler; the LoRA must be the one plain training gives (dropouts on and an epoch boundary crossed)."""
    from jobs import get_job

    finals = {}
    for flag in (False, True):
        cfg = merge(tiny_config_dict(tmp_path / f"out_{flag}", tiny_model_dir, demo_data_dir),
                    {"train.distributed_training": flag, "train.batch_size": 1, "train.steps": 10,
                     "network.dropout": 0.1, "sample.prompts": [], "save.save_every": 1000})
        cfg["config"]["process"][0]["datasets"][0]["caption_dropout_rate"] = 0.3
        finals[flag] = get_job(write_config(tmp_path / f"cfg_{flag}.yaml", cfg)).run()[0]
    off, on = lora_tensors(finals[False]), lora_tensors(finals[True])
    assert off.keys() == on.keys() and off
    assert all(torch.equal(off[k], on[k]) for k in off)


def test_rank_seed_differs_per_rank_and_repeats():
    from toolkit.dist import rank_seed

    seeds = [rank_seed(42, rank) for rank in range(8)]
    assert len(set(seeds)) == 8
    assert seeds == [rank_seed(42, rank) for rank in range(8)]
    assert rank_seed(43, 0) != seeds[0]
    assert all(0 <= s < 2**63 for s in seeds)


def test_runtime_refuses_a_multi_process_launch_without_the_flag(monkeypatch):
    from toolkit.dist import Runtime
    from toolkit.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="distributed_training is false"):
        Runtime(distributed=False, device="cpu")


def test_available_cores_respects_affinity():
    from toolkit.dist import available_cores

    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def test_bench_config_is_a_valid_quiet_distributed_run(tmp_path, tiny_model_dir, demo_data_dir):
    """tools.bench_scaling's config copy passes the strict loader and trains without samples or step saves."""
    from tools.bench_scaling import bench_config
    from toolkit.config.loader import load_job_dict

    raw = tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir)
    job = load_job_dict(bench_config(raw, tmp_path / "bench", steps=7, model=str(tiny_model_dir)), "bench")
    process = job.config.process[0]
    assert process.train.distributed_training and process.train.disable_sampling and process.train.steps == 7
    assert process.save.save_every > 7 and process.log_every == 1
    assert process.training_folder == str(tmp_path / "bench")
    assert raw["config"]["process"][0]["train"]["steps"] == 4  # the original is left alone

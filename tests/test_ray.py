"""`run.py --launcher ray`: the trainer on Ray Train workers (2 CPU workers over gloo on a local Ray instance).

One Ray session serves the module (starting Ray and its worker groups is the slow part: tens of seconds on a busy
2-core machine). The one Ray training run also proves the restart path: rank 0 deletes the run folder's training
states and fails as step 4 starts (tests/dist_scripts/run_with_probes.py, installed in the Ray workers by
ray_worker_hook.py); Ray restarts the worker group (--max-failures 1), which can only resume from the checkpoint it
reported to Ray. The final LoRA must still equal the uninterrupted accelerate 2-process run of the same config.
Select with `pytest -m ray`; skipped when ray is not installed (requirements-ray.txt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import run
from tests.helpers import REPO, merge, tiny_config_dict, write_config
from tests.launch import SCRIPTS, accelerate_launch, explain, lora_tensors, read_probes
from tools.demo_data import build_demo_dataset

STEPS = {"train.steps": 6, "save.save_every": 3, "sample.prompts": []}
RAY_ARGS = ["--launcher", "ray", "--num-workers", "2", "--max-failures", "1"]


def ray_config(folder: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    cfg = merge(tiny_config_dict(folder / "out", model_dir, data_dir, name="ray"),
                {"train.distributed_training": True, "train.batch_size": 1, **STEPS, **overrides})
    return write_config(folder / "ray.yaml", cfg)


def reported_checkpoints(storage: Path) -> list[Path]:
    """Ray's copies of the training states, oldest first (checkpoint_<timestamp> folders)."""
    return sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())


@pytest.fixture(scope="module")
def six_pairs(tmp_path_factory) -> Path:
    """6 pairs in 3 buckets of 2: 2 workers x batch 1 train every item once per 3 steps."""
    return build_demo_dataset(tmp_path_factory.mktemp("six") / "data", num_pairs=6, seed=1)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray instance with 2 CPUs for the module; its Train workers carry the probes and the fault."""
    pytest.importorskip("ray", reason="ray is not installed: pip install -r requirements-ray.txt")
    import ray

    from jobs.ray_launcher import connect

    probes = tmp_path_factory.mktemp("ray_probes")
    env = {"KONTEXT_TEST_PROBE_DIR": str(probes), "KONTEXT_TEST_FAIL": "0:4:lose_states", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "KONTEXT_CPU_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if ray.is_initialized():
        ray.shutdown()
    connect(None, {"env_vars": env, "worker_process_setup_hook": "tests.dist_scripts.ray_worker_hook.install"},
            num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield probes
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_session, tiny_model_dir, six_pairs):
    folder = tmp_path_factory.mktemp("ray_run")
    config = ray_config(folder, tiny_model_dir, six_pairs)
    assert run.main([str(config), *RAY_ARGS]) == 0
    return {"config": config, "probes": read_probes(ray_session), "run_dir": folder / "out" / "ray",
            "storage": folder / "out" / "ray_checkpoints" / "ray"}


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory, tiny_model_dir, six_pairs):
    """The same config (another output folder), 2 processes under accelerate launch, uninterrupted."""
    folder = tmp_path_factory.mktemp("accelerate_run")
    config = ray_config(folder, tiny_model_dir, six_pairs)
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_PROBE_DIR": str(folder)})
    assert proc.returncode == 0, explain(proc)
    return {"probes": read_probes(folder), "run_dir": folder / "out" / "ray"}


# -- the Ray run ---------------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_restarted_workers_resume_from_the_checkpoint_reported_to_ray(ray_run):
    run_dir, storage = ray_run["run_dir"], ray_run["storage"]
    assert (run_dir / "ray.safetensors").is_file()
    # The fault deleted state/000000003 before step 4: the restarted group had only Ray's copy to resume from.
    assert sorted(p.name for p in (run_dir / "state").iterdir()) == ["000000006"]
    for probe in ray_run["probes"]:
        assert probe["world_size"] == 2
        assert len(probe["micro_batches"]) == 3, "the restarted workers trained steps 4-6 only"
    reported = reported_checkpoints(storage)
    assert len(reported) == 2  # steps 3 and 6 (save.max_step_saves_to_keep 2)
    steps = [json.loads((p / "trainer.json").read_text())["step"] for p in reported]
    assert steps == [3, 6]
    assert (reported[-1] / "COMPLETE").is_file()


@pytest.mark.ray
def test_ray_workers_see_disjoint_shards_covering_the_epoch(ray_run):
    rank0, rank1 = (p["micro_batches"] for p in ray_run["probes"])
    assert all(len(b["index"]) == 1 for b in rank0 + rank1)
    assert all(a["epoch"] == b["epoch"] == 1 for a, b in zip(rank0, rank1))  # steps 4-6 are the second epoch
    mine = {i for b in rank0 for i in b["index"]}
    theirs = {i for b in rank1 for i in b["index"]}
    assert mine.isdisjoint(theirs) and mine | theirs == set(range(6))


@pytest.mark.ray
def test_ray_workers_end_with_identical_lora_and_only_rank_0_writes(ray_run):
    rank0, rank1 = ray_run["probes"]
    assert rank0["lora_sha256"] == rank1["lora_sha256"]
    assert rank1["writes"] == []
    assert "lora:ray.safetensors" in rank0["writes"]


@pytest.mark.ray
def test_ray_lora_equals_the_accelerate_two_process_run(ray_run, accelerate_run):
    ray_lora = lora_tensors(ray_run["run_dir"] / "ray.safetensors")
    accel_lora = lora_tensors(accelerate_run["run_dir"] / "ray.safetensors")
    assert ray_lora.keys() == accel_lora.keys() and ray_lora
    worst = max((ray_lora[k] - accel_lora[k]).abs().max().item() for k in ray_lora)
    assert worst < 1e-6, worst
    assert any(v.abs().sum() > 0 for k, v in ray_lora.items() if ".lora_B." in k)
    for ray_probe, accel_probe in zip(ray_run["probes"], accelerate_run["probes"]):
        assert [b["index"] for b in ray_probe["micro_batches"]] == \
               [b["index"] for b in accel_probe["micro_batches"][3:]]


@pytest.mark.ray
def test_a_ray_checkpoint_is_adopted_only_by_the_config_that_saved_it(ray_run, tmp_path, tiny_model_dir, six_pairs):
    from jobs import get_job
    from jobs.ray_launcher import adopt_state

    state = reported_checkpoints(ray_run["storage"])[-1]
    same = get_job(ray_run["config"])
    assert adopt_state(same.processes, state) is same.processes[0]
    assert same.processes[0].train.resume_from == str(state)
    other = get_job(ray_config(tmp_path, tiny_model_dir, six_pairs, **{"train.lr": 5e-4}))
    assert adopt_state(other.processes, state) is None and other.processes[0].train.resume_from is None


# -- no Ray needed -------------------------------------------------------------------------------------------------
def test_missing_ray_exits_2_naming_the_install_command(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch,
                                                        capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    config = ray_config(tmp_path, tiny_model_dir, demo_data_dir)
    assert run.main([str(config), "--launcher", "ray", "--num-workers", "2"]) == 2
    assert "pip install -r requirements-ray.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ray_launch_refuses_a_config_without_distributed_training(tmp_path, tiny_model_dir, demo_data_dir,
                                                                  monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # refused before Ray is even imported
    config = ray_config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.distributed_training": False})
    assert run.main([str(config), "--launcher", "ray", "--num-workers", "2"]) == 2
    assert "config.process[0].train.distributed_training must be true" in capsys.readouterr().err


@pytest.mark.parametrize("device, gpu, message", [("cuda", False, "--use-gpu is not given"),
                                                   ("cpu", True, "--use-gpu reserves a GPU")])
def test_ray_launch_refuses_a_device_that_contradicts_use_gpu(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch,
                                                              capsys, device, gpu, message):
    monkeypatch.setitem(sys.modules, "ray", None)
    config = ray_config(tmp_path, tiny_model_dir, demo_data_dir, device=device)
    argv = [str(config), "--launcher", "ray", "--num-workers", "2"] + (["--use-gpu"] if gpu else [])
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert f"config.process[0].device is {device}" in err and message in err


@pytest.mark.parametrize("argv", [["--num-workers", "2"], ["--use-gpu"], ["--address", "auto"],
                                  ["--launcher", "ray"]])
def test_ray_flags_need_the_ray_launcher_and_a_worker_count(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run.parse_args(["cfg.yaml", *argv])
    assert exc.value.code == 2
    assert "--launcher ray" in capsys.readouterr().err


def test_requirements_ray_pins_ray():
    lines = [line.strip() for line in (REPO / "requirements-ray.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    assert len(pins) == 1 and pins[0].startswith("ray[train]==")


def test_runtime_leaves_rays_process_group_alone(monkeypatch):
    """Under Ray the group is Ray's: Runtime.end must not destroy it (Ray does, when the worker ends)."""
    from toolkit import dist

    monkeypatch.setenv(dist.LAUNCHER_ENV, "ray")
    rt = dist.Runtime(distributed=False, device="cpu")
    destroyed = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a: destroyed.append(a))
    rt.end()
    assert rt.under_ray and destroyed == []

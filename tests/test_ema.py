"""EMA of the LoRA weights (train.ema_config, toolkit.train.ema): the math, the swap, saves, samples, resume, 2 processes.

The training runs start from config/examples/train_lora_flux_kontext_ema_tiny.yaml (pointed at the test model and
data, 4 steps) with ema_decay 0.5 and an update every 2 steps, so the average visibly differs from the weights and a
resume at an odd step needs the saved step counter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import run
from extensions.flux_kontext.model import FluxKontext
from tests.helpers import REPO, merge, write_config
from toolkit.config.loader import ConfigProblems, load_job_config
from toolkit.train.ema import EMA, EMA_FILE, ema_decay_at, ema_update, load_ema_state
from toolkit.adapters.lora import lora_state_dict

EXAMPLE = REPO / "config" / "examples" / "train_lora_flux_kontext_ema_tiny.yaml"
DECAY = 0.5
NAME = "tiny_kontext_ema_demo"


def _file_key(param_name: str) -> str:
    """Parameter name -> key in a saved LoRA file (`transformer.` prefix, no peft adapter name)."""
    return "transformer." + param_name.replace(".default", "")


def _as_file(tensors: dict) -> dict:
    return {_file_key(k): v for k, v in tensors.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def example_config(folder: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    """The example EMA config with test paths, 4 steps of batch 1, a kept state every step, samples every 2 steps."""
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    process = raw["config"]["process"][0]
    ctrl = data_dir / "sample_control" / "sample_000.png"
    process["sample"]["prompts"] = [f"[trigger] invert the colors --ctrl_img {ctrl}"]
    process["datasets"][0].update(folder_path=str(data_dir / "target"), control_path=str(data_dir / "control"),
                                  resolution=[64])
    cfg = merge(raw, {"training_folder": str(folder / "out"), "model.name_or_path": str(model_dir),
                      "model.max_sequence_length": 16, "log_every": 1, "train.steps": 4, "train.batch_size": 1,
                      "save.save_every": 1, "save.max_step_saves_to_keep": 10, "sample.sample_every": 2,
                      "sample.sample_steps": 2, "sample.prompts": process["sample"]["prompts"],
                      "train.ema_config.ema_decay": DECAY, "train.ema_config.ema_warmup": False,
                      "train.ema_config.ema_update_every": 2, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "ema.yaml", cfg)


def _state(run_dir: Path, step: int) -> tuple[dict, dict]:
    """(live fp32 weights, EMA state) of a saved training state."""
    folder = run_dir / "state" / f"{step:09d}"
    return load_file(str(folder / "lora.safetensors")), load_ema_state(folder / EMA_FILE)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """The example run; records the LoRA weights the model holds each time it renders samples."""
    folder = tmp_path_factory.mktemp("ema")
    sampled = []
    original = FluxKontext.sample

    def recording_sample(self, requests, controls, **kwargs):
        sampled.append({k: v.clone() for k, v in lora_state_dict(self.transformer).items()})  # views on CPU
        return original(self, requests, controls, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxKontext, "sample", recording_sample)
        assert run.main([str(example_config(folder, tiny_model_dir, demo_data_dir))]) == 0
    logging.getLogger().handlers.clear()
    return folder / "out" / NAME, sampled


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """The same run with EMA off."""
    folder = tmp_path_factory.mktemp("plain")
    config = example_config(folder, tiny_model_dir, demo_data_dir, **{"train.ema_config.use_ema": False})
    assert run.main([str(config)]) == 0
    logging.getLogger().handlers.clear()
    return folder / "out" / NAME


# -- the math ---------------------------------------------------------------------------------------------------
def test_ema_update_is_the_decay_formula():
    average, live = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 2.0, 0.5])
    expected = 0.9 * average + 0.1 * live
    assert torch.allclose(ema_update(average, live, 0.9), expected)
    assert torch.allclose(average, expected), "in place"
    assert ema_decay_at(0.99, 1, warmup=False) == 0.99
    assert ema_decay_at(0.99, 1, warmup=True) == 2 / 11
    assert ema_decay_at(0.99, 10_000, warmup=True) == 0.99


def test_step_every_n_and_swap_restores_the_training_weights_exactly():
    param = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    ema = EMA({"w": param}, 0.5, update_every=2, on_cpu=True)
    with torch.no_grad():
        param.copy_(torch.tensor([4.0, 1.0 / 3.0]))
    ema.step()
    assert torch.equal(ema.average["w"], torch.tensor([0.0, 1.0])) and ema.updates == 0
    ema.step()
    assert torch.equal(ema.average["w"], ema_update(torch.tensor([0.0, 1.0]), param.detach(), 0.5))
    assert ema.average["w"].device.type == "cpu" and ema.updates == 1
    live = param.detach().clone()
    with ema.applied():
        assert torch.equal(param.detach(), ema.average["w"])
    assert torch.equal(param.detach(), live)
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("sampling failed")
    assert torch.equal(param.detach(), live), "put back even when the swapped-in work fails"


def test_bad_ema_config_names_the_key(tmp_path, tiny_model_dir, demo_data_dir):
    for key, value in (("ema_decay", 1.0), ("ema_update_every", 0), ("ema_on_gpu", True)):
        config = example_config(tmp_path, tiny_model_dir, demo_data_dir, **{f"train.ema_config.{key}": value})
        with pytest.raises(ConfigProblems) as caught:
            load_job_config(config, environ={})
        assert any(p.startswith(f"config.process[0].train.ema_config.{key}") for p in caught.value.problems), \
            caught.value.problems


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_average_on_the_cpu_beside_device_weights():
    param = torch.nn.Parameter(torch.randn(3, 4, device="cuda"))
    ema = EMA({"w": param}, 0.9, on_cpu=True)
    start = ema.average["w"].clone()
    with torch.no_grad():
        param.add_(1.0)
    ema.step()
    assert ema.average["w"].device.type == "cpu"
    assert torch.equal(ema.average["w"], ema_update(start, param.detach().cpu(), 0.9))
    live = param.detach().clone()
    with ema.applied():
        assert param.device.type == "cuda" and torch.equal(param.detach().cpu(), ema.average["w"])
    assert torch.equal(param.detach(), live)


def test_config_hash_ignores_only_where_the_average_lives(tmp_path, tiny_model_dir, demo_data_dir):
    from toolkit.state import train_state
    from toolkit.config.loader import load_job_dict

    def digest(**overrides):
        raw = yaml.safe_load(example_config(tmp_path, tiny_model_dir, demo_data_dir, **overrides).read_text())
        return train_state.config_hash(train_state.training_config(load_job_dict(raw, "test").config.process[0]))

    base = digest()
    assert digest(**{"train.ema_config.ema_on_cpu": True}) == base
    for key, value in (("use_ema", False), ("ema_decay", 0.9), ("ema_update_every", 1), ("ema_warmup", True)):
        assert digest(**{f"train.ema_config.{key}": value}) != base, key


# -- training with EMA --------------------------------------------------------------------------------------------
def test_average_follows_the_formula_and_differs_from_the_weights(ema_run):
    run_dir, _ = ema_run
    states = {step: _state(run_dir, step) for step in (1, 2, 3, 4)}
    live1, ema1 = states[1]
    assert ema1["steps"] == 1 and ema1["updates"] == 0
    for name, tensor in ema1["average"].items():  # no update yet: the start, where lora_B is zero
        if "lora_B" in name:
            assert not tensor.any()
    for step in (2, 4):  # updates at steps 2 and 4, checked against the pure function on every tensor
        live, ema = states[step]
        before = states[step - 1][1]["average"]
        expected = {k: ema_update(before[k].clone(), live[k], DECAY) for k in before}
        assert _equal(ema["average"], expected), step
        assert ema["updates"] == step // 2
    assert _equal(states[3][1]["average"], states[2][1]["average"])
    live4, ema4 = states[4]
    assert not _equal(live4, ema4["average"]), "the average is not the live weights"


def test_saved_loras_hold_the_average_and_training_is_undisturbed(ema_run, plain_run):
    run_dir, _ = ema_run
    for step in (1, 2, 3, 4):
        _, ema = _state(run_dir, step)
        saved = run_dir / (f"{NAME}_{step:09d}.safetensors" if step < 4 else f"{NAME}.safetensors")
        assert _equal(load_file(str(saved)), _as_file(ema["average"])), saved
    # Swapping the average in and out for samples and saves leaves the training exactly as without EMA.
    for step in (2, 4):
        live_plain = load_file(str(plain_run / "state" / f"{step:09d}" / "lora.safetensors"))
        assert _equal(_state(run_dir, step)[0], live_plain)
    assert not (plain_run / "state" / "000000004" / EMA_FILE).exists()


def test_samples_use_the_average(ema_run):
    run_dir, sampled = ema_run
    assert len(sampled) == 3  # steps 0, 2, 4
    for weights, step in zip(sampled[1:], (2, 4)):
        assert _equal(weights, _as_file(_state(run_dir, step)[1]["average"]))
    assert not _equal(sampled[2], _as_file(_state(run_dir, 4)[0]))


def test_resume_at_an_odd_step_gives_the_same_loras(ema_run, tmp_path, tiny_model_dir, demo_data_dir, capsys):
    reference, _ = ema_run
    run_dir = tmp_path / "out" / NAME
    shutil.copytree(reference, run_dir)
    (run_dir / f"{NAME}.safetensors").unlink()
    shutil.rmtree(run_dir / "state" / "000000004")
    assert run.main([str(example_config(tmp_path, tiny_model_dir, demo_data_dir))]) == 0
    assert f"resuming from {run_dir / 'state' / '000000003'}: step 3 of 4" in capsys.readouterr().err
    assert _equal(load_file(str(run_dir / f"{NAME}.safetensors")), load_file(str(reference / f"{NAME}.safetensors")))
    ema, ref = _state(run_dir, 4)[1], _state(reference, 4)[1]
    assert _equal(ema["average"], ref["average"]) and (ema["steps"], ema["updates"]) == (4, 2)


def test_turning_ema_on_at_a_resume_starts_from_the_restored_weights(plain_run, tmp_path, tiny_model_dir,
                                                                     demo_data_dir, capsys):
    run_dir = tmp_path / "out" / NAME
    shutil.copytree(plain_run, run_dir)
    (run_dir / f"{NAME}.safetensors").unlink()
    shutil.rmtree(run_dir / "state" / "000000004")
    config = example_config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.resume_from": "latest"})
    assert run.main([str(config)]) == 0
    assert "holds no EMA (saved with train.ema_config.use_ema off)" in capsys.readouterr().err
    live3 = load_file(str(run_dir / "state" / "000000003" / "lora.safetensors"))
    live4, ema4 = _state(run_dir, 4)
    expected = {k: ema_update(live3[k].clone(), live4[k], DECAY) for k in live3}
    assert _equal(ema4["average"], expected)


# -- two processes ------------------------------------------------------------------------------------------------
def _digest(tensors: dict) -> str:
    """Like tests/dist_scripts/run_with_probes.py's lora_digest, from a LoRA file's tensors."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        digest.update(key.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.distributed
def test_two_processes_keep_the_same_average_and_resume_exactly(tmp_path, tiny_model_dir, demo_data_dir):
    """gloo, 2 ranks x batch 1, 2 prompts (each rank renders one with the average swapped in): every rank holds the
    same average at the final save, the main process's files hold it, and a 2-process resume ends the same."""
    from tests.launch import SCRIPTS, accelerate_launch, explain

    ctrl = demo_data_dir / "sample_control" / "sample_000.png"
    overrides = {"train.distributed_training": True, "save.save_every": 2,
                 "sample.prompts": [f"a --ctrl_img {ctrl}", f"b --ctrl_img {ctrl} --seed 3"]}
    config = example_config(tmp_path, tiny_model_dir, demo_data_dir, **overrides)
    run_dir = tmp_path / "out" / NAME
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_PROBE_DIR": str(tmp_path)})
    assert proc.returncode == 0, explain(proc)
    probes = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in range(2)]
    assert [p["world_size"] for p in probes] == [2, 2]
    assert all(p["rendered"] for p in probes), "both ranks sampled"
    final = load_file(str(run_dir / f"{NAME}.safetensors"))
    assert probes[0]["lora_sha256"] == probes[1]["lora_sha256"] == _digest(final)
    live, ema = _state(run_dir, 4)
    assert _equal(final, _as_file(ema["average"])) and not _equal(final, _as_file(live))

    reference = tmp_path / "reference.safetensors"
    shutil.move(run_dir / f"{NAME}.safetensors", reference)
    shutil.rmtree(run_dir / "state" / "000000004")
    proc = accelerate_launch(REPO / "run.py", config)
    assert proc.returncode == 0, explain(proc)
    assert "resuming from" in proc.stderr and "step 2 of 4" in proc.stderr, explain(proc)
    assert _equal(load_file(str(run_dir / f"{NAME}.safetensors")), load_file(str(reference)))

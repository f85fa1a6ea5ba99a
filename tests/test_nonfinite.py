"""The non-finite guard (toolkit.train.nonfinite): a NaN/Inf step is skipped on every rank, never saved, and a run
that keeps producing them stops with exit status 1 and its good checkpoints intact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
from tests.helpers import merge, tiny_config_dict, write_config
from tests.launch import SCRIPTS, accelerate_launch, ddp_config, explain, read_probes
from toolkit.state import train_state
from toolkit.state.train_state import list_states


def _config(folder: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    base = {"train.steps": 6, "train.batch_size": 1, "save.save_every": 1, "save.max_step_saves_to_keep": 10,
            "sample.prompts": []}
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "tiny.yaml", merge(tiny_config_dict(folder / "out", model_dir, data_dir),
                                                    {**base, **overrides}))


def _poison(monkeypatch, bad_steps) -> None:
    """The loss of optimizer steps in `bad_steps` (1-based, this process) is NaN (batch 1, no accumulation)."""
    original = BaseSDTrainProcess.compute_loss
    calls = {"n": 0}

    def compute_loss(self, run_, batch):
        calls["n"] += 1
        loss = original(self, run_, batch)
        return loss * float("nan") if bad_steps(calls["n"]) else loss

    monkeypatch.setattr(BaseSDTrainProcess, "compute_loss", compute_loss)


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_a_nan_step_is_skipped_logged_with_its_files_and_never_saved(tmp_path, tiny_model_dir, demo_data_dir,
                                                                     monkeypatch, capsys):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir)
    _poison(monkeypatch, lambda step: step == 3)
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "out" / "tiny"
    assert [s for s, _ in list_states(run_dir)] == [1, 2, 4, 5, 6]  # nothing saved from step 3
    assert not (run_dir / "tiny_000000003.safetensors").exists()
    warning = next(line for line in capsys.readouterr().err.splitlines()
                   if "step 3: the loss or the gradient norm" in line)
    assert str(demo_data_dir / "target") in warning  # names the batch's image
    for path in [run_dir / "tiny.safetensors", *run_dir.glob("tiny_*.safetensors")]:
        assert _all_finite(path), path
    state = train_state.load_state(run_dir / "state" / "000000006", 0)
    assert {int(s["step"]) for s in state.optimizer["state"].values()} == {5}  # 6 steps, 5 applied


def test_nan_steps_in_a_row_stop_with_exit_1_and_the_good_checkpoints_intact(tmp_path, tiny_model_dir,
                                                                             demo_data_dir, monkeypatch, capsys):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"save.max_step_saves_to_keep": 2,
                                                                  "train.steps": 12})
    _poison(monkeypatch, lambda step: step >= 3)
    assert run.main([str(config)]) == 1
    run_dir = tmp_path / "out" / "tiny"
    assert [s for s, _ in list_states(run_dir)] == [1, 2]
    assert all(train_state.check_state(p) is None for _, p in list_states(run_dir))
    assert _all_finite(run_dir / "state" / "000000002" / train_state.LORA_FILE)
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["tiny_000000001.safetensors",
                                                                     "tiny_000000002.safetensors"]
    text = capsys.readouterr().err
    assert "3 steps in a row (train.max_nonfinite_steps) had a non-finite loss or gradient at step 5" in text
    assert "000000002) is intact" in text
    assert "Traceback" not in text


def test_saving_refuses_nan_weights_and_keeps_older_checkpoints(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    """Weights that became NaN without a NaN loss (defence in depth): the save refuses, pruning never runs."""
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"save.max_step_saves_to_keep": 2})
    original = BaseSDTrainProcess._after_step

    def after_step(self, run_, step, result):
        if step == 4:
            with torch.no_grad():
                run_.params[0].fill_(math.nan)
        return original(self, run_, step, result)

    monkeypatch.setattr(BaseSDTrainProcess, "_after_step", after_step)
    assert run.main([str(config)]) == 1
    run_dir = tmp_path / "out" / "tiny"
    assert [s for s, _ in list_states(run_dir)] == [2, 3]
    assert not (run_dir / "tiny_000000004.safetensors").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("mode, code", [("nan", 0), ("nan_on", 1)])
def test_two_processes_skip_together_when_one_rank_has_a_nan(mode, code, tmp_path, tiny_model_dir, demo_data_dir):
    """Rank 1 alone has a NaN loss at step 2 (`nan_on`: from step 2 on): both ranks skip the same steps, keep the
    same finite LoRA; three in a row stop every rank with exit 1."""
    config = ddp_config(tmp_path, tiny_model_dir, demo_data_dir, "nan",
                        **{"train.steps": 5, "sample.prompts": [], "save.save_every": 1,
                           "save.max_step_saves_to_keep": 10})
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config,
                             env={"KONTEXT_TEST_FAIL": f"1:2:{mode}", "KONTEXT_TEST_PROBE_DIR": str(tmp_path)})
    assert proc.returncode == code, explain(proc)
    run_dir = tmp_path / "out" / "nan"
    if code == 0:
        assert [s for s, _ in list_states(run_dir)] == [1, 3, 4, 5]
        probes = read_probes(tmp_path)
        assert probes[0]["lora_sha256"] == probes[1]["lora_sha256"]
        assert _all_finite(run_dir / "nan.safetensors")
    else:
        assert [s for s, _ in list_states(run_dir)] == [1]
        assert "3 steps in a row" in proc.stderr, explain(proc)
        assert not (run_dir / "nan.safetensors").exists()

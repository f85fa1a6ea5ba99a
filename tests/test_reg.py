"""Regularisation datasets (is_reg): ai-toolkit's step choice, captions and loss weight, their own sharded stream,
and an exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import run
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
from tests.helpers import assert_same_tensors, merge, tiny_config_dict, write_config
from tests.test_unpaired import dataset_cfg, plain_folder
from toolkit.config.loader import load_job_dict
from toolkit.data.dataset import PairedDataset
from toolkit.data.pairs import discover_pairs
from toolkit.errors import ConfigError
from toolkit.state.train_state import read_info
from toolkit.train.reg_schedule import RegSchedule, StepBatches


def test_every_other_step_is_reg_except_before_a_save_or_a_sampling_round():
    schedule = RegSchedule(save_every=5, sample_every=3, sample_start_step=0)
    assert [s for s in range(1, 13) if schedule.is_reg(s)] == [1, 7, 11]  # 3 and 9 sample, 5 saves
    assert schedule.reg_steps(12) == 3 and schedule.reg_steps(6) == 1
    no_sampling = RegSchedule(save_every=100, sample_every=0)
    assert [s for s in range(1, 8) if no_sampling.is_reg(s)] == [1, 3, 5, 7]


def test_step_batches_give_a_reg_step_all_its_micro_batches():
    batches = StepBatches(iter(range(100)), iter(range(-1, -100, -1)), RegSchedule(save_every=100, sample_every=0),
                          start_step=2, accumulation=2)  # steps 3, 4, 5: reg, train, reg
    assert [next(batches) for _ in range(6)] == [-1, -2, 0, 1, -3, -4]


def test_reg_captions_keep_their_words_and_weigh_reg_weight(demo_data_dir, tmp_path):
    plain = plain_folder(demo_data_dir, tmp_path / "reg", count=1)
    configs = [dataset_cfg(plain, is_reg=True, loss_multiplier=2.0)]
    dataset = PairedDataset(discover_pairs(configs), configs, trigger_word="inv3rt", seed=0, reg_weight=0.25)
    item = dataset[0]
    assert "inv3rt" not in item["caption"] and float(item["loss_multiplier"]) == 0.5
    trained = dataset_cfg(plain, loss_multiplier=2.0)
    assert PairedDataset(discover_pairs([trained]), [trained], "inv3rt", 0)[0]["caption"].startswith("inv3rt")


def test_only_reg_datasets_are_refused(tmp_path, tiny_model_dir, demo_data_dir):
    raw = tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir)
    dataset = raw["config"]["process"][0]["datasets"][0]
    with pytest.raises(ConfigError, match="every dataset has is_reg: true"):
        load_job_dict(merge(raw, {"datasets": [{**dataset, "is_reg": True}]}), "cfg.yaml")


def reg_config(folder: Path, model_dir: Path, data_dir: Path, reg_dir: Path, **overrides) -> Path:
    """8 training pairs (random_crop: the demo's non-square images have slack) and 3 plain regularisation images,
    batch 1, 10 steps, a kept state every 2 steps."""
    cfg = tiny_config_dict(folder / "out", model_dir, data_dir)
    paired = {**cfg["config"]["process"][0]["datasets"][0], "random_crop": True}
    reg = {"folder_path": str(reg_dir), "is_reg": True, "caption_ext": "txt", "caption_dropout_rate": 0.0,
           "resolution": [64]}
    base = {"datasets": [paired, reg], "train.steps": 10, "train.batch_size": 1, "train.reg_weight": 0.5,
            "save.save_every": 2, "save.max_step_saves_to_keep": 10, "network.dropout": 0.1,
            "sample.sample_every": 1000}
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "tiny.yaml", merge(cfg, {**base, **overrides}))


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """An uninterrupted 10-step run with regularisation data, recording each micro-batch's paths and weights."""
    folder = tmp_path_factory.mktemp("reg_run")
    reg_dir = plain_folder(demo_data_dir, folder / "reg", count=3)
    seen: list[tuple[list[str], list[float]]] = []
    original = BaseSDTrainProcess.compute_loss

    def recording(self, ctx, batch):
        seen.append((list(batch["path"]), [float(w) for w in batch["loss_multiplier"]]))
        return original(self, ctx, batch)

    BaseSDTrainProcess.compute_loss = recording
    try:
        assert run.main([str(reg_config(folder, tiny_model_dir, demo_data_dir, reg_dir))]) == 0
    finally:
        BaseSDTrainProcess.compute_loss = original
    return {"folder": folder, "reg_dir": reg_dir, "seen": seen, "run_dir": folder / "out" / "tiny"}


def test_reg_batches_come_on_the_odd_steps_with_reg_weight(reg_run):
    seen, reg_dir = reg_run["seen"], reg_run["reg_dir"]
    assert len(seen) == 10
    reg_steps = [step for step, (paths, _) in enumerate(seen, start=1) if Path(paths[0]).parent == reg_dir]
    assert reg_steps == [1, 3, 5, 7, 9]  # save_every 2: every odd step is a reg step
    assert all(weights == [0.5] for step, (_, weights) in enumerate(seen, start=1) if step in reg_steps)
    assert all(weights == [1.0] for step, (_, weights) in enumerate(seen, start=1) if step not in reg_steps)
    reg_paths = [seen[step - 1][0][0] for step in reg_steps]
    assert set(reg_paths[:3]) == {str(p) for p in reg_dir.glob("*.png")}  # one reg epoch: every reg image once
    main_paths = [seen[step - 1][0][0] for step in range(1, 11) if step not in reg_steps]
    assert len(set(main_paths)) == 5  # the training stream is not consumed by reg steps
    info = read_info(reg_run["run_dir"] / "state" / "000000004")
    assert (info["consumed_batches"], info["reg_consumed_batches"]) == (2, 2)


def test_resume_with_reg_data_and_random_crop_is_exact(reg_run, tmp_path, tiny_model_dir, demo_data_dir):
    """Resumed from step 4 (mid reg epoch) and from step 6 (after a reg epoch): the same LoRA, bit for bit."""
    for resume_at in (4, 6):
        copy = tmp_path / f"from_{resume_at}"
        shutil.copytree(reg_run["folder"], copy)
        run_dir = copy / "out" / "tiny"
        (run_dir / "tiny.safetensors").unlink()
        for state in (run_dir / "state").iterdir():
            if int(state.name) > resume_at:
                shutil.rmtree(state)
        config = reg_config(copy, tiny_model_dir, demo_data_dir, reg_run["reg_dir"])
        assert run.main([str(config)]) == 0
        assert_same_tensors(reg_run["run_dir"] / "tiny.safetensors", run_dir / "tiny.safetensors")

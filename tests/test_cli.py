"""run.py as users call it: exit codes, --recover, --name, --log, errors before any model loads, no secret leaks."""

from __future__ import annotations

import logging

import pytest
import yaml

import run
from tests.helpers import REPO, merge, tiny_config_dict, write_config

SECRET = "hf_TESTsecretVALUE1234567890"


def _config(tmp_path, model_dir, data_dir, name="tiny", **overrides):
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir, name=name), {"train.steps": 2, **overrides})
    return write_config(tmp_path / f"{name}.yaml", cfg)


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys, no_model_load):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: extension\nconfig:\n  name: x\n  process: [\n", encoding="utf-8")
    assert run.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "line" in err


def test_unknown_key_is_reported_with_suggestion(tmp_path, capsys, tiny_model_dir, demo_data_dir, no_model_load):
    path = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.learnin_rate": 1e-4})
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "config.process[0].train.learnin_rate" in err and "lr" in err
    assert not (tmp_path / "out").exists()


def test_dataset_problem_stops_before_model_loads(tmp_path, capsys, tiny_model_dir, demo_data_dir, no_model_load):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    (data / "control" / "pair_003.png").unlink()
    (data / "target" / "pair_005.png").write_bytes(b"")
    path = _config(tmp_path, tiny_model_dir, data)
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "pair_003" in err and "pair_005.png" in err


def test_unknown_architecture_lists_known_ones(tmp_path, capsys, tiny_model_dir, demo_data_dir, no_model_load):
    path = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"model.arch": "flux_kontxt"})
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "flux_kontxt" in err and "flux_kontext" in err


def test_recover_runs_the_next_config_and_fails_at_the_end(tmp_path, tiny_model_dir, demo_data_dir, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: extension\n", encoding="utf-8")
    good = _config(tmp_path, tiny_model_dir, demo_data_dir, name="good")
    assert run.main([str(bad), str(good)]) == 2  # without --recover the good one never runs
    assert not (tmp_path / "out" / "good" / "good.safetensors").exists()
    assert run.main(["--recover", str(bad), str(good)]) == 2
    assert (tmp_path / "out" / "good" / "good.safetensors").is_file()


def test_name_override_and_log_file(tmp_path, tiny_model_dir, demo_data_dir):
    path = _config(tmp_path, tiny_model_dir, demo_data_dir)
    log_file = tmp_path / "logs" / "run.log"
    assert run.main([str(path), "--name", "renamed", "--log", str(log_file)]) == 0
    out = tmp_path / "out" / "renamed"
    assert (out / "renamed.safetensors").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["config"]["name"] == "renamed" and saved["meta"]["name"] == "renamed"
    assert "done: 2 steps" in log_file.read_text(encoding="utf-8")


def test_config_found_by_name_under_config_folder(monkeypatch):
    from toolkit.config.loader import find_config_file

    assert find_config_file("examples/train_lora_flux_kontext_tiny") == \
        REPO / "config" / "examples" / "train_lora_flux_kontext_tiny.yaml"


def test_token_never_reaches_logs_config_or_metadata(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    """HF_TOKEN from the environment, also pulled into the config through ${HF_TOKEN}, appears in no output."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir),
                {"train.steps": 2, "save.save_every": 1, "trigger_word": "inv3rt"})
    cfg["meta"]["hub_token"] = "${HF_TOKEN}"
    cfg["meta"]["note"] = "token is ${HF_TOKEN}"
    path = write_config(tmp_path / "secret.yaml", cfg)
    log_file = tmp_path / "run.log"
    logging.getLogger("probe").info("leak attempt %s", SECRET)  # before run.main installs redaction: not captured
    assert run.main([str(path), "--log", str(log_file)]) == 0
    logging.getLogger("probe").warning("leak attempt %s", SECRET)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] + [log_file]
    assert len(files) > 5
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert "leak attempt ***" in log_file.read_text(encoding="utf-8")


def _point_at_test_data(process: dict, tmp_path, model_dir, data_dir) -> None:
    """Paths of an ai-toolkit corpus config -> test folders; fewer steps and smaller samples (minutes otherwise)."""
    process["training_folder"] = str(tmp_path / "output")
    process["datasets"][0]["folder_path"] = str(data_dir / "target")
    process["datasets"][0]["control_path"] = str(data_dir / "control")
    process["model"]["name_or_path"] = str(model_dir)
    ctrl = str(data_dir / "sample_control" / "sample_000.png")
    sample = process["sample"]
    if "samples" in sample:
        sample["samples"] = [{**item, "ctrl_img": ctrl} for item in sample["samples"]]
    else:
        sample["prompts"] = [p.split("--ctrl_img")[0] + f"--ctrl_img {ctrl}" for p in sample["prompts"]]
    process["train"]["steps"] = 2
    sample.update(width=256, height=256, sample_steps=2)


@pytest.mark.parametrize("corpus", ["flux_kontext_24gb.yaml", "ui_flux_kontext_job.yaml"])
def test_ai_toolkit_config_runs_with_only_paths_changed(corpus, tmp_path, tiny_model_dir, demo_data_dir):
    """ai-toolkit's Kontext example and its web UI's Kontext job (quantize, adamw8bit, bf16, weighted, cuda) run here
    as they are, apart from paths, steps and sample size."""
    import shutil

    data = yaml.safe_load((REPO / "tests" / "data" / "aitoolkit" / corpus).read_text())
    data_dir = shutil.copytree(demo_data_dir, tmp_path / "data")  # cache_latents_to_disk writes next to the data
    _point_at_test_data(data["config"]["process"][0], tmp_path, tiny_model_dir, data_dir)
    path = write_config(tmp_path / "ai_toolkit.yaml", data)
    assert run.main([str(path)]) == 0
    name = data["config"]["name"]
    out = tmp_path / "output" / name
    assert (out / f"{name}.safetensors").is_file()
    assert (out / "samples" / "000000000_sheet.png").is_file()



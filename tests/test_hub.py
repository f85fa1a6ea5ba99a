"""save.push_to_hub, offline: the access check before any model loads, the upload plan and the model card of a real
tiny run folder, the `run.py push` subcommand and the end-of-training failure message. Nothing reaches the Hub
(HF_HUB_OFFLINE=1, from conftest) and nothing imitates it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

import run
from jobs import get_job
from jobs.compare import load_run
from jobs.push import write_card
from tests.helpers import REPO, merge, tiny_config_dict, write_config
from toolkit.config import load_job_config
from toolkit.publish.hub import HubError, latest_samples, token_problem, upload_plan, uploads_sample_images
from toolkit.publish.model_card import RunFacts, hub_base_model, model_card

SECRET = "hf_PUSHsecretVALUE13579abcdef"


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: neither in the environment nor in a `hf auth login` file."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_model_dir, demo_data_dir) -> Path:
    """A finished 2-step tiny run with its final samples (trained without push_to_hub). Read-only: copy to change."""
    root = tmp_path_factory.mktemp("hubrun")
    cfg = merge(tiny_config_dict(root / "out", tiny_model_dir, demo_data_dir), {"train.steps": 2})
    get_job(write_config(root / "cfg.yaml", cfg)).run()
    return root / "out" / "tiny"


def _push_config(tmp_path, model_dir, data_dir) -> Path:
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir),
                {"train.steps": 1, "save.push_to_hub": True, "save.hf_repo_id": "someone/tiny-lora"})
    return write_config(tmp_path / "push.yaml", cfg)


# -- before any model loads ---------------------------------------------------------------------------------------
def test_offline_push_stops_before_any_model_loads(tmp_path, tiny_model_dir, demo_data_dir, no_model_load,
                                                    monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert run.main([str(_push_config(tmp_path, tiny_model_dir, demo_data_dir))]) == 2
    err = capsys.readouterr().err
    assert "save.push_to_hub: HF_HUB_OFFLINE is set" in err and "save.push_to_hub: false" in err, err
    assert SECRET not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # stopped before the run folder was made


def test_missing_token_stops_before_any_model_loads(tmp_path, tiny_model_dir, demo_data_dir, no_model_load,
                                                     no_token, capsys):
    assert run.main([str(_push_config(tmp_path, tiny_model_dir, demo_data_dir))]) == 2
    err = capsys.readouterr().err
    assert "save.push_to_hub: no Hugging Face token found" in err and "HF_TOKEN" in err and ".env" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("repo_id, expected", [
    ("no-namespace", "save.hf_repo_id: must be a Hub repository id 'namespace/name'"),
    ("me/bad--name", "save.hf_repo_id: must be a Hub repository id"),
    (None, "save.hf_repo_id: required when save.push_to_hub is true"),
])
def test_bad_repo_id_is_a_config_error(tmp_path, repo_id, expected):
    from toolkit.config import ConfigProblems

    cfg = merge(tiny_config_dict(tmp_path, tmp_path, tmp_path), {"save.push_to_hub": True, "save.hf_repo_id": repo_id})
    with pytest.raises(ConfigProblems) as info:
        load_job_config(write_config(tmp_path / "c.yaml", cfg))
    assert f"config.process[0].{expected}" in str(info.value)


def test_ai_toolkit_aliases_get_a_did_you_mean(tmp_path):
    from toolkit.config import ConfigProblems

    cfg = merge(tiny_config_dict(tmp_path, tmp_path, tmp_path), {"save.hub_model_id": "me/x"})
    with pytest.raises(ConfigProblems, match="save.hub_model_id: unknown key; did you mean 'hf_repo_id'"):
        load_job_config(write_config(tmp_path / "c.yaml", cfg))


def test_hub_example_config_validates(monkeypatch):
    monkeypatch.setenv("HF_USER", "someone")
    save = load_job_config(REPO / "config/examples/train_lora_flux_kontext_hub_tiny.yaml").config.process[0].save
    assert save.push_to_hub and save.hf_repo_id == "someone/tiny-kontext-lora" and save.hf_private


WRITE = {"role": "write"}


@pytest.mark.parametrize("repo_id, token, problem", [
    ("me/x", WRITE, None),
    ("team/x", WRITE, None),
    ("other/x", WRITE, "belongs to 'me', which cannot create repositories under 'other'"),
    ("me/x", {"role": "read"}, "read-only"),
    ("team/x", {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"type": "user", "name": "me"}, "permissions": ["repo.write"]}]}}, "no 'repo.write' permission"),
    ("me/x", {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"type": "user", "name": "me"}, "permissions": ["repo.content.read", "repo.write"]}]}}, None),
    ("team/x", {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"type": "model", "name": "team/x"}, "permissions": ["repo.write"]}]}}, None),
])
def test_token_problem(repo_id, token, problem):
    whoami = {"name": "me", "orgs": [{"name": "team"}], "auth": {"accessToken": token}}
    found = token_problem(whoami, repo_id)
    assert (found is None) if problem is None else (problem in found), found


# -- what goes up -------------------------------------------------------------------------------------------------
def test_upload_plan_of_a_finished_run(run_folder):
    plan = {dst: src for src, dst in upload_plan(run_folder, "tiny")}
    assert plan == {"tiny.safetensors": run_folder / "tiny.safetensors", "README.md": run_folder / "README.md",
                    "samples/000000002_sheet.png": run_folder / "samples/000000002_sheet.png",
                    "samples/000000002_00.png": run_folder / "samples/000000002_00.png"}
    # too big for the gallery: only the contact sheet goes up
    assert [dst for _, dst in upload_plan(run_folder, "tiny", max_sample_bytes=0)] == \
        ["tiny.safetensors", "README.md", "samples/000000002_sheet.png"]
    with pytest.raises(HubError, match="no final LoRA"):
        upload_plan(run_folder, "other_name")


def test_model_card_of_a_tiny_run(run_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    name, process = load_run(run_folder)
    samples = latest_samples(run_folder)
    facts = RunFacts(name=name, repo_id="me/tiny", weight_name="tiny.safetensors", samples=samples,
                     sample_images_uploaded=uploads_sample_images(samples), dataset_size=8)
    card = model_card(process, facts)
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert "base_model" not in meta  # a local folder is no Hub id; the body names it
    assert "(base model: tiny-flux-kontext)" in body
    assert {"flux", "kontext", "lora", "image-to-image"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "image-to-image" and meta["instance_prompt"] == "inv3rt"
    assert meta["widget"] == [{"text": "inv3rt invert", "output": {"url": "samples/000000002_00.png"}}]
    uploaded = {dst for _, dst in upload_plan(run_folder, "tiny")}
    assert "samples/000000002_00.png" in uploaded and "samples/000000002_sheet.png" in uploaded
    for text in ("Use `inv3rt` in the prompt", "| inv3rt invert | ![sample 0](samples/000000002_00.png) |",
                 "![samples at step 2](samples/000000002_sheet.png)", "| steps | 2 |",
                 "| learning rate | 0.001 (constant, 0 warm-up steps) |", "| optimizer | adamw |",
                 "| LoRA rank / alpha | 4 / 4 |", "| batch | 2 per process x 1 processes x 1 accumulation = 2 |",
                 "| resolution | 64 px", "| dataset | 8 image pairs |",
                 'pipe.load_lora_weights("me/tiny", weight_name="tiny.safetensors")'):
        assert text in card, text
    assert SECRET not in card and str(run_folder.parent.parent) not in card  # no token, no local paths


def test_model_card_of_a_hub_base_model_has_its_license(run_folder):
    _, process = load_run(run_folder)
    for base in ("black-forest-labs/FLUX.1-Kontext-dev",
                 "/cache/hub/models--black-forest-labs--FLUX.1-Kontext-dev/snapshots/abc123"):
        assert hub_base_model(base) == "black-forest-labs/FLUX.1-Kontext-dev"
        cfg = dataclasses.replace(process, model=dataclasses.replace(process.model, name_or_path=base))
        meta = yaml.safe_load(model_card(cfg, RunFacts(name="x", repo_id="me/x", weight_name="x.safetensors"))
                              .split("---\n", 2)[1])
        assert meta["base_model"] == "black-forest-labs/FLUX.1-Kontext-dev"
        assert meta["license"] == "other" and meta["license_name"] == "flux-1-dev-non-commercial-license"
        assert "widget" not in meta  # no samples uploaded


def test_push_dry_run_writes_the_card_and_uploads_nothing(run_folder, tmp_path, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(run_folder, folder)
    assert run.main(["push", str(folder), "--repo-id", "me/tiny", "--dry-run"]) == 0
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "| dataset | 8 image pairs |" in card  # counted from the run's datasets
    err = capsys.readouterr().err
    assert "would upload" in err and "me/tiny:samples/000000002_00.png" in err


def test_push_without_repo_or_network_says_what_to_do(run_folder, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(run_folder, folder)
    assert run.main(["push", str(folder)]) == 2  # trained without save.hf_repo_id
    assert "give --repo-id namespace/name" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert run.main(["push", str(folder), "--repo-id", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and SECRET not in err


def test_failed_upload_after_training_keeps_the_lora_and_says_how_to_retry(tmp_path, tiny_model_dir, demo_data_dir,
                                                                            monkeypatch, capsys):
    """The access check at start passes (skipped here), the Hub is then unreachable (offline): training finishes,
    the LoRA and the card stay in the run folder, exit 2 names the file and the retry command."""
    import jobs.process.BaseSDTrainProcess as trainer

    monkeypatch.setattr(trainer, "check_hub_access", lambda repo_id: None)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert run.main([str(_push_config(tmp_path, tiny_model_dir, demo_data_dir))]) == 2
    err = capsys.readouterr().err
    folder = tmp_path / "out" / "tiny"
    final = folder / "tiny.safetensors"
    assert "the upload to the Hugging Face Hub failed" in err and "HF_HUB_OFFLINE is set" in err, err
    assert f"The trained LoRA is saved: {final}" in err and f"python run.py push {folder}" in err
    assert final.is_file() and (folder / "README.md").is_file() and SECRET not in err


def test_card_file_is_written_into_the_run_folder(run_folder, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(run_folder, folder)
    name, process = load_run(folder)
    path = write_card(folder, name, process, "me/tiny", dataset_size=3)
    assert path == folder / "README.md" and "| dataset | 3 image pairs |" in path.read_text(encoding="utf-8")

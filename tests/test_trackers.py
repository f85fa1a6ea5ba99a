"""Weights & Biases and MLflow trackers (process `trackers`, ai-toolkit's logging.use_wandb), offline: the scalars
TensorBoard gets reach both, the run parameters hide secrets, and a missing package is named before any model loads.
`make test` installs requirements-trackers.txt, so nothing here skips in CI."""

from __future__ import annotations

from pathlib import Path

import run
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.train import trackers

SECRET = "hf_TrackerTestSecret0123456789"


def test_a_missing_tracker_package_is_named_before_any_model_loads(tmp_path, monkeypatch, no_model_load, capsys):
    monkeypatch.setitem(trackers.PACKAGES, "use_mlflow", ("no_such_mlflow_module", "mlflow-skinny"))
    config = write_config(tmp_path / "c.yaml", merge(tiny_config_dict(tmp_path / "out", tmp_path, tmp_path),
                                                     {"trackers.use_mlflow": True}))
    assert run.main([str(config)]) != 0
    err = capsys.readouterr().err
    assert ("trackers.use_mlflow: the mlflow-skinny package is not installed; run `pip install -r "
            "requirements-trackers.txt`") in err


def test_scalars_reach_wandb_and_mlflow_offline_with_secrets_redacted(tmp_path, monkeypatch, tiny_model_dir,
                                                                      demo_data_dir):
    import wandb
    from mlflow.tracking import MlflowClient

    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    store = (tmp_path / "mlruns").as_uri()
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir),
                {"train.steps": 2, "train.disable_sampling": True, "log_every": 1,
                 "trackers": {"use_wandb": True, "use_mlflow": True, "project_name": "edits",
                              "mlflow_tracking_uri": store}})
    cfg["config"]["process"][0]["datasets"][0]["default_caption"] = f"caption with {SECRET} inside"
    try:
        assert run.main([str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    finally:
        wandb.teardown()
    client = MlflowClient(tracking_uri=store)
    (found,) = client.search_runs([client.get_experiment_by_name("edits").experiment_id])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [1, 2]
    assert found.info.run_name == "tiny" and found.data.params["train.steps"] == "2"
    assert found.data.params["datasets.0.default_caption"] == "caption with *** inside"
    (offline,) = (tmp_path / "out" / "tiny" / "wandb").glob("offline-run-*/*.wandb")
    assert b"train/loss" in offline.read_bytes() and b"datasets.0.default_caption" in offline.read_bytes()
    for path in [offline, *Path(tmp_path / "mlruns").rglob("*")]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_turning_a_tracker_on_does_not_change_the_resume_config(tmp_path):
    """Trackers decide nothing about the weights: a run may be resumed with W&B or MLflow switched on."""
    from toolkit.config.loader import load_job_dict
    from toolkit.state.train_state import config_hash, training_config

    base = tiny_config_dict(tmp_path / "out", tmp_path, tmp_path)
    hashes = [config_hash(training_config(load_job_dict(cfg, "c.yaml", environ={}).config.process[0]))
              for cfg in (base, merge(base, {"trackers.use_wandb": True}))]
    assert hashes[0] == hashes[1]

"""tools.bench on the tiny model: every JSON field is there and sane (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import merge, tiny_config_dict, write_config
from tools import bench
from tools.bench_report import PHASES, contention_warning, peak_tflops

PHASE_KEYS = set(PHASES)
FIELDS = {
    "config", "model", "warmup_steps", "setup_seconds", "device", "device_name", "dtype", "world_size",
    "torch_threads", "batch_size", "gradient_accumulation_steps", "samples_per_step", "transformer_params",
    "trainable_params", "tokens_per_sample", "tokens_per_sample_range", "measured_steps", "step_seconds_median",
    "step_seconds_min", "step_seconds_max", "step_seconds_mean", "samples_per_second", "breakdown_seconds",
    "instrumented_step_seconds", "instrumented_vs_real", "reference_step_seconds_median", "overhead_ratio",
    "overhead_goal", "load_average_1min", "cpu_cores", "peak_rss_mib", "peak_gpu_allocated_mib",
    "sdpa_calls_per_forward", "flops_per_step", "flops_convention", "achieved_tflops", "peak_tflops", "mfu",
    "contention_warning", "encoder_seconds", "encoders_loaded",
}


def _config(tmp_path, model_dir, data_dir, **overrides):
    # A sample prompt and a resume setting in the config must not matter: the bench turns both off.
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), {"train.resume_from": "latest",
                                                                          **overrides})
    return write_config(tmp_path / "bench.yaml", cfg)


def _run(capsys, *argv):
    assert bench.main([*map(str, argv)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(bench.JSON_PREFIX)]
    assert len(lines) == 1, out
    return json.loads(lines[0][len(bench.JSON_PREFIX):]), out


def test_bench_reports_every_field(tmp_path, tiny_model_dir, demo_data_dir, capsys):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir)
    result, out = _run(capsys, config, "--warmup", "2", "--steps", "2")
    assert set(result) == FIELDS
    assert "overhead ratio" in out and "phase" in out  # the table came too
    assert result["device"] == "cpu" and result["device_name"] == "cpu" and result["dtype"] == "torch.float32"
    assert result["world_size"] == 1 and result["torch_threads"] >= 1 and result["cpu_cores"] >= 1
    assert result["measured_steps"] == 2 and result["warmup_steps"] == 2
    assert result["batch_size"] == 2 and result["samples_per_step"] == 2
    assert 0 < result["trainable_params"] < result["transformer_params"]
    # tiny preset: 1 double + 2 single blocks, one SDPA call each; 16 text tokens + target and control tokens
    assert result["sdpa_calls_per_forward"] == 3
    low, high = result["tokens_per_sample_range"]
    assert 16 < low <= result["tokens_per_sample"] <= high
    for key in ("setup_seconds", "step_seconds_median", "step_seconds_min", "step_seconds_max",
                "step_seconds_mean", "samples_per_second", "instrumented_step_seconds",
                "reference_step_seconds_median", "overhead_ratio", "instrumented_vs_real", "peak_rss_mib",
                "flops_per_step"):
        assert result[key] > 0, key
    assert result["step_seconds_min"] <= result["step_seconds_median"] <= result["step_seconds_max"]
    assert result["samples_per_second"] == pytest.approx(2 / result["step_seconds_median"], rel=1e-3)
    phases = result["breakdown_seconds"]
    assert set(phases) == PHASE_KEYS and all(v >= 0 for v in phases.values())
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0 and phases["data"] > 0
    assert phases["vae_encode"] > 0  # no latent cache in this config
    assert sum(phases.values()) == pytest.approx(result["instrumented_step_seconds"], rel=1e-3)
    # The instrumented step is the real step plus clocks: same order of time (loose: tiny steps are noisy).
    assert 0.2 < result["instrumented_vs_real"] < 5
    assert result["overhead_goal"] == 1.10
    # CPU: no GPU memory, no TFLOP/s nor MFU
    assert result["peak_gpu_allocated_mib"] is None and result["achieved_tflops"] is None
    assert result["peak_tflops"] is None and result["mfu"] is None


def test_bench_json_only_and_cached_inputs(tmp_path, tiny_model_dir, demo_data_dir, capsys):
    """With latents and captions cached the encoder phases vanish; --json-only prints nothing else."""
    cached = {"folder_path": str(demo_data_dir / "target"), "control_path": str(demo_data_dir / "control"),
              "caption_dropout_rate": 0.0, "resolution": [64], "cache_latents": True}
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.cache_text_embeddings": True,
                                                                 "datasets": [cached]})
    result, out = _run(capsys, config, "--warmup", "1", "--steps", "1", "--json-only")
    assert out.count("\n") == 1
    assert result["breakdown_seconds"]["vae_encode"] == 0 and result["breakdown_seconds"]["text_encode"] == 0


def test_missing_model_names_the_build_command(tmp_path, demo_data_dir, capsys, caplog):
    config = _config(tmp_path, tmp_path / "models" / "medium-flux-kontext", demo_data_dir)
    assert bench.main([str(config), "--steps", "1"]) == 2
    assert f"python -m tools.tiny_model --out {tmp_path / 'models' / 'medium-flux-kontext'} --preset medium" \
        in caplog.text


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                        ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
                                        ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165),
                                        ("NVIDIA A10G", 125), ("NVIDIA H100 NVL", None), ("Tesla T4", None)])
def test_peak_table(name, peak):
    assert peak_tflops(name) == peak


def test_contention_warning_only_when_the_load_exceeds_the_cores(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (2.5, 1.0, 1.0))
    assert contention_warning(4) is None
    assert "2.5 on 2 cores" in contention_warning(2)


def test_bench_quant_rows_say_what_they_are_compared_to_and_merge_repeats():
    from tools.bench_quant import COMPARED_TO, VARIANTS, format_table, merge_repeats

    assert set(COMPARED_TO) == set(VARIANTS)
    assert all(base is None or base in VARIANTS for base in COMPARED_TO.values())

    def row(name, seconds, encode):
        return {"variant": name, "step_seconds": seconds, "step_seconds_all": [seconds], "encode_seconds": encode,
                "setup_seconds": 1.0, "peak_rss_mib": 100.0, "peak_training_rss_mib": 90.0, "peak_device_mib": None,
                "transformer_weight_bytes": 1000, "loss_before": 1.0, "loss_after": 0.9}

    full = merge_repeats([row("full precision", 1.0, 0.2), row("full precision", 3.0, 0.2),
                          row("full precision", 2.0, 0.4)])
    assert full["step_seconds"] == 2.0 and full["run_medians"] == [1.0, 3.0, 2.0] and full["encode_seconds"] == 0.2
    table = format_table([full, row("full precision + latent and text caching", 1.6, 0.0)])
    assert "x0.80 vs full precision (encoders were 10% of it)" in table

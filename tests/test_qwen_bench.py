"""tools.bench on the tiny Qwen-Image-Edit-Plus twin: it runs, and its VAE and prompt-encoder time land in their own
phases (the architecture's encode_images / encode_captions), not in "other"."""

from __future__ import annotations

from tests.test_bench import FIELDS, _run
from tests.test_qwen_train import example
from tools.demo_data import build_demo_dataset


def test_bench_runs_on_the_qwen_twin_with_encoder_phases(tmp_path, tiny_qwen_dir, capsys):
    data = build_demo_dataset(tmp_path / "demo_multi", num_pairs=2, num_controls=2)
    config = example(tmp_path, tiny_qwen_dir, data, **{"train.resume_from": "latest"})
    result, out = _run(capsys, config, "--warmup", "1", "--steps", "1")
    assert set(result) == FIELDS and "overhead ratio" in out
    assert result["sdpa_calls_per_forward"] == 2  # the tiny transformer's two blocks
    assert result["breakdown_seconds"]["vae_encode"] > 0 and result["breakdown_seconds"]["text_encode"] > 0
    assert 0 < result["trainable_params"] < result["transformer_params"]
    low, high = result["tokens_per_sample_range"]
    assert 0 < low <= result["tokens_per_sample"] <= high

"""Gradient accumulation really accumulates: batch 1 x 2 micro-steps == batch 2 x 1 step (ai-toolkit drops grads)."""

from __future__ import annotations

import pytest
import torch

from jobs import get_job
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.train import flow_matching
from toolkit.data.dataset import collate_batch
from toolkit.dist import Runtime
from toolkit.adapters.lora import lora_state_dict


def per_sample_loss(process, ctx, batch):
    """compute_loss with noise and timestep fixed per dataset item, so any batching sees the same samples."""
    encoded = ctx.model.encode_batch(batch)
    x0 = ctx.model.clean_latents(encoded)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(i)))
                         for i in batch["index"]])
    t = torch.tensor([0.15 + 0.1 * (int(i) % 7) for i in batch["index"]])
    inputs, target = flow_matching.inputs_and_target(ctx.model, encoded, noise, t, 1.0)
    return flow_matching.flow_matching_loss(ctx.denoiser(**inputs), target, torch.ones(len(t)))


def one_step(tmp_path, model_dir, data_dir, batch_size, accumulation, monkeypatch):
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir),
                {"train.batch_size": batch_size, "train.gradient_accumulation_steps": accumulation,
                 "train.optimizer": "sgd", "train.lr": 0.5, "train.max_grad_norm": 0.0, "network.dropout": 0.0})
    tmp_path.mkdir(parents=True, exist_ok=True)
    process = get_job(write_config(tmp_path / f"cfg_{batch_size}_{accumulation}.yaml", cfg)).processes[0]
    monkeypatch.setattr(type(process), "compute_loss", per_sample_loss)
    pairs, requests, outputs = process.preflight()
    ctx = process.setup(Runtime(distributed=False, device="cpu"), pairs, [], outputs)
    dataset = ctx.dataset
    same_bucket = [i for i, k in enumerate(dataset.bucket_keys) if k == dataset.bucket_keys[0]][:2]
    items = [dataset[i] for i in same_bucket]
    chunks = [items[k:k + batch_size] for k in range(0, len(items), batch_size)]
    ctx.batches = iter([collate_batch(c) for c in chunks])
    before = {k: v.clone() for k, v in lora_state_dict(ctx.model.transformer).items()}
    process.optimizer_step(ctx)
    after = lora_state_dict(ctx.model.transformer)
    return before, after


def test_two_micro_batches_equal_one_double_batch(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    start_a, accumulated = one_step(tmp_path / "a", tiny_model_dir, demo_data_dir, 1, 2, monkeypatch)
    start_b, batched = one_step(tmp_path / "b", tiny_model_dir, demo_data_dir, 2, 1, monkeypatch)
    for key in start_a:
        assert torch.equal(start_a[key], start_b[key])  # same seed, same LoRA init
    moved = max((batched[k] - start_b[k]).abs().max().item() for k in batched)
    assert moved > 1e-4, "the step changed nothing"
    worst = max((accumulated[k] - batched[k]).abs().max().item() for k in batched)
    assert worst < 1e-6, worst


def test_dropping_a_micro_batch_would_be_caught(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    """The comparison above is sensitive: a run that saw only the second micro-batch differs."""
    _, accumulated = one_step(tmp_path / "a", tiny_model_dir, demo_data_dir, 1, 2, monkeypatch)
    _, single = one_step(tmp_path / "c", tiny_model_dir, demo_data_dir, 1, 1, monkeypatch)
    worst = max((accumulated[k] - single[k]).abs().max().item() for k in single)
    assert worst > 1e-5


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])

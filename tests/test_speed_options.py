"""Speed options that must not change what is trained: DataLoader workers (train.num_workers) and regional
torch.compile (train.compile)."""

from __future__ import annotations

import shutil

import pytest
import torch

from jobs import get_job
from tests.helpers import first_bucket_batch, fixed_inputs, merge, tiny_config_dict, write_config
from toolkit.train import flow_matching
from toolkit.dist import Runtime
from toolkit.adapters.lora import lora_state_dict


def _ctx(tmp_path, model_dir, data_dir, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), overrides)
    process = get_job(write_config(tmp_path / "cfg.yaml", cfg)).processes[0]
    pairs, requests, outputs = process.preflight()
    return process, process.setup(Runtime(distributed=False, device="cpu"), pairs, requests, outputs)


def test_cpu_runs_default_to_no_workers_and_an_explicit_value_wins():
    rt = Runtime(distributed=False, device="cpu")
    try:
        assert rt.data_workers(None) == 0 and rt.data_workers(3) == 3
    finally:
        rt.end()


def test_workers_give_the_same_batches_as_the_main_process(tmp_path, tiny_model_dir, demo_data_dir):
    """Over two epochs (epoch-dependent caption dropout): same items, pixels and captions in the same order."""
    drawn = {}
    for workers in (0, 2):
        _, ctx = _ctx(tmp_path / str(workers), tiny_model_dir, demo_data_dir, **{
            "train.num_workers": workers, "datasets": [{
                "folder_path": str(demo_data_dir / "target"), "control_path": str(demo_data_dir / "control"),
                "caption_dropout_rate": 0.5, "resolution": [64]}]})
        drawn[workers] = [next(ctx.batches) for _ in range(2 * len(ctx.sampler) + 1)]
    for a, b in zip(drawn[0], drawn[2]):
        assert a["caption"] == b["caption"] and a["path"] == b["path"]
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["control"], b["control"])
    assert {c for batch in drawn[0] for c in batch["caption"]} >= {""}  # dropout really happened


def _loss_and_grads(ctx) -> tuple[float, dict[str, torch.Tensor]]:
    inputs, target = fixed_inputs(ctx.model, first_bucket_batch(ctx.dataset))
    loss = flow_matching.flow_matching_loss(ctx.denoiser(**inputs), target, torch.ones(2))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ctx.model.transformer.named_parameters() if p.grad is not None}
    ctx.optimizer.zero_grad(set_to_none=True)
    return loss.item(), grads


def _check_compiled_matches_eager(tmp_path, model_dir, data_dir) -> None:
    torch._dynamo.reset()
    _, eager = _ctx(tmp_path / "eager", model_dir, data_dir, **{"network.dropout": 0.0})
    _, compiled = _ctx(tmp_path / "compiled", model_dir, data_dir,
                       **{"network.dropout": 0.0, "train.compile": True})
    blocks = [m for m in compiled.model.transformer.modules() if type(m).__name__ == "FluxTransformerBlock"]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    loss_e, grads_e = _loss_and_grads(eager)
    loss_c, grads_c = _loss_and_grads(compiled)
    assert loss_c == pytest.approx(loss_e, rel=1e-4, abs=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-5)
    keys = set(lora_state_dict(compiled.model.transformer))
    assert keys == set(lora_state_dict(eager.model.transformer)) and not any("_orig_mod" in k for k in keys)
    torch._dynamo.reset()


def test_compiled_blocks_match_eager_through_dynamo_and_autograd(tmp_path, tiny_model_dir, demo_data_dir,
                                                                  monkeypatch):
    """The wiring (in-place regional compile, LoRA inside, keys) with the aot_eager backend: seconds, no C++."""
    monkeypatch.setattr("toolkit.train.compile.COMPILE_OPTIONS", {"backend": "aot_eager"})
    _check_compiled_matches_eager(tmp_path, tiny_model_dir, demo_data_dir)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "gcc", "clang++")),
                    reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_inductor_compiled_blocks_give_the_same_loss_and_gradients(tmp_path, tiny_model_dir, demo_data_dir):
    """What train.compile really runs (inductor C++ kernels): about a minute of compiling on 2 CPU cores."""
    _check_compiled_matches_eager(tmp_path, tiny_model_dir, demo_data_dir)

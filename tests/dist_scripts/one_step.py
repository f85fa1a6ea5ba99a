"""One optimizer step of the real trainer with noise and timesteps fixed per SAMPLE: `python one_step.py CONFIG OUT`.

For tests/test_distributed.py: run it as 1 process x batch 2 and as 2 processes x batch 1 (under accelerate) on the
same two items; the LoRA after the step must agree, which holds only if the gradient all-reduce really happens.

The trainer is built by BaseSDTrainProcess.setup and stepped by optimizer_step (so the loss goes through whatever
module setup wrapped); only compute_loss is replaced, by the same objective with the per-rank random noise and
timesteps replaced by values derived from each item's dataset index, so the union of the ranks' micro-batches is the
single-process batch. The main process saves the LoRA tensors (a full fine-tune: the transformer's) to OUT
(safetensors); every rank writes OUT.rank<R>.json with the item indices it trained on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jobs import get_job  # noqa: E402
from toolkit.dist import Runtime  # noqa: E402
from toolkit.adapters.lora import lora_state_dict  # noqa: E402
from toolkit.train import flow_matching  # noqa: E402


def per_sample(indices: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (B, *shape) and timesteps (B,) that depend only on each item's index."""
    noise, t = [], []
    for index in indices:
        g = torch.Generator().manual_seed(1000 + index)
        noise.append(torch.randn(shape, generator=g))
        t.append(0.15 + 0.7 * torch.rand((), generator=g))
    return torch.stack(noise), torch.stack(t)


def main(config: str, out: Path) -> None:
    process = get_job(config).processes[0]
    pairs, requests, outputs = process.preflight()
    rt = Runtime(distributed=process.train.distributed_training, device="cpu")
    try:
        ctx = process.setup(rt, pairs, requests, outputs)
        seen: list[int] = []
        guidance = process.train.guidance

        def compute_loss(run, batch):  # the trainer's objective, with noise and t fixed per item
            seen[:] = [int(i) for i in batch["index"]]
            encoded = run.model.encode_batch(batch)
            noise, t = per_sample(seen, tuple(run.model.clean_latents(encoded).shape[1:]))
            inputs, target = flow_matching.inputs_and_target(run.model, encoded, noise, t, guidance)
            return flow_matching.flow_matching_loss(run.denoiser(**inputs), target, torch.ones(len(seen)))

        process.compute_loss = compute_loss
        process.optimizer_step(ctx)
        if rt.is_main:  # the trained tensors: the LoRA, or a full fine-tune's whole transformer
            trained = (ctx.model.transformer.state_dict() if process.full_finetune
                       else lora_state_dict(ctx.model.transformer))
            save_file({k: v.detach().contiguous().clone() for k, v in trained.items()}, str(out))
        # What DDP would broadcast at wrap time and all-reduce: frozen base weights (quantized or not) and buffers
        # must all be on its ignore list, or every step would sync the whole model.
        ignored = getattr(ctx.denoiser, "parameters_to_ignore", None)
        inner = getattr(ctx.denoiser, "module", ctx.denoiser)
        frozen_synced = None if ignored is None else sorted(
            [n for n, p in inner.named_parameters() if not p.requires_grad and n not in ignored]
            + [n for n, _ in inner.named_buffers() if n not in ignored])
        Path(f"{out}.rank{rt.rank}.json").write_text(
            json.dumps({"rank": rt.rank, "world_size": rt.world_size, "index": seen,
                        "ddp": type(ctx.denoiser).__name__, "frozen_synced": frozen_synced}), encoding="utf-8")
        rt.wait()
    finally:
        rt.end()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

"""`python -m tools.bench_compile [--model DIR] [--rounds N]`: is train.compile worth it here?

Two copies of the model's transformer with the same LoRA, one eager and one with train.compile's in-place regional
compilation (toolkit.train.compile), train step by step INTERLEAVED in one process (eager, compiled, eager, ...) so a load
change on a shared machine hits both alike. Per bucket of the medium benchmark data (three token counts at 128 px):
the first step of each (compile time included), then the median seconds of forward + backward + AdamW over N rounds,
and the break-even step count (compile seconds / seconds saved per step). It builds its own inputs (T5 length 128):
no data, no encoders.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch

GRIDS = [(16, 16), (12, 16), (16, 12)]  # latent grids of the demo data's buckets at 128 px
TEXT_TOKENS = 128
JSON_PREFIX = "BENCH_COMPILE_JSON "


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_compile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/medium-flux-kontext", help="a diffusers FLUX Kontext folder")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds over the buckets (default 4)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N (fp32 either way)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import FluxTransformer2DModel

    from extensions.flux_kontext.model import LORA_TARGETS, KontextDenoiser
    from extensions.flux_kontext.rope_cache import IdTables
    from tools.bench_report import contention_warning
    from toolkit.train.compile import check_compile, compile_blocks
    from toolkit.dist import available_cores
    from toolkit.adapters.lora import add_lora, make_lora_config

    warning = contention_warning(available_cores())
    if warning:
        sys.stderr.write(f"WARNING: {warning}\n")
    device = torch.device(args.device)
    check_compile(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base = FluxTransformer2DModel.from_pretrained(f"{args.model}/transformer").requires_grad_(False).to(device)
    runs = {}
    for name in ("eager", "compiled"):
        transformer = copy.deepcopy(base)
        params = add_lora(transformer, make_lora_config(16, 16, LORA_TARGETS, 0.0))
        transformer.train()
        if name == "compiled":
            compile_blocks(transformer)
        runs[name] = (KontextDenoiser(transformer), torch.optim.AdamW(params, lr=1e-4))
    cfg, tables = base.config, IdTables()

    def inputs(grid: tuple[int, int]) -> dict:
        g, n = torch.Generator().manual_seed(1), grid[0] * grid[1] // 4
        x = {"hidden_states": torch.randn(1, n, cfg.in_channels, generator=g),
             "control_tokens": torch.randn(1, n, cfg.in_channels, generator=g),
             "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
             "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
             "timestep": torch.tensor([0.5]), "guidance": torch.tensor([1.0]) if cfg.guidance_embeds else None}
        return {**{k: v.to(device) if v is not None else None for k, v in x.items()},
                "img_ids": tables.image_ids(grid, [grid], device),
                "txt_ids": tables.text_ids(TEXT_TOKENS, device, torch.float32)}

    def step(name: str, x: dict) -> float:
        denoiser, optimizer = runs[name]
        sync()
        start = time.perf_counter()
        denoiser(**x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    first = {name: [step(name, inputs(grid)) for grid in GRIDS] for name in runs}  # compiled: compile included
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for grid in GRIDS:
            x = inputs(grid)
            for name in runs:
                times[name].append(step(name, x))
    median = {name: statistics.median(v) for name, v in times.items()}
    compile_seconds = sum(first["compiled"]) - sum(first["eager"])
    saved = median["eager"] - median["compiled"]
    result = {"first_step_seconds": first, "step_seconds_median": median, "compiled_vs_eager":
              median["compiled"] / median["eager"], "compile_seconds": compile_seconds,
              "break_even_steps": compile_seconds / saved if saved > 0 else None,
              "measured_steps_each": len(times["eager"]), "torch_threads": torch.get_num_threads(),
              "load_average_1min": os.getloadavg()[0], "contention_warning": warning}
    sys.stdout.write(f"first step per bucket {GRIDS}: eager {[round(s, 2) for s in first['eager']]} s, compiled "
                     f"{[round(s, 2) for s in first['compiled']]} s\nmedian s/step: eager {median['eager']:.4f}, "
                     f"compiled {median['compiled']:.4f} (x{result['compiled_vs_eager']:.3f}); compiling cost "
                     f"{compile_seconds:.0f} s; break-even after "
                     f"{'never' if saved <= 0 else f'{compile_seconds / saved:.0f}'} steps\n")
    sys.stdout.write(JSON_PREFIX + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Numbers and text for tools.bench: transformer FLOPs of a step, device peak throughput, the printed table.

FLOP convention (model FLOPs, as in MFU papers; gradient-checkpointing recompute is NOT counted):
- every nn.Linear call does 2 * rows * in * out forward FLOPs, rows = tokens it sees (counted with forward hooks
  on one real forward, so text, image and per-sample embedding layers each get their true row count);
- attention (every torch.nn.functional.scaled_dot_product_attention call) does 4 * B * heads * Lq * Lk * head_dim
  forward FLOPs (QK^T and PV), i.e. 4 * seq^2 * dim per layer for self-attention;
- backward: a frozen Linear needs only its input gradient (1x forward), a trainable one (LoRA A/B) input and weight
  gradients (2x forward); attention backward is 2x forward. So a step is 2x forward for the frozen base, 3x for LoRA
  layers and attention. The very first frozen layers (whose input needs no gradient) are counted 2x too: an upper
  estimate by a few percent at most.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets. Matched on the
# lower-cased torch.cuda.get_device_name(); the first entry whose words all appear wins (PCIe before SXM).
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], Optional[float]], ...] = (
    (("h100", "nvl"), None),  # not in our table: better 'unknown' than the SXM figure
    (("h100", "pcie"), 756.0),
    (("h100",), 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (("h200",), 989.0),
    (("a100",), 312.0),
    (("l40s",), 362.0),
    (("rtx 4090",), 165.0),
    (("a10g",), 125.0),
)

PHASES = ("data", "vae_encode", "text_encode", "forward", "backward", "optimizer", "logging", "other")
PHASE_HELP = {
    "data": "next(batches): DataLoader, image decode/resize, collate",
    "vae_encode": "VAE encoder (0 with cached latents)",
    "text_encode": "text encoders (0 once every caption is cached)",
    "forward": "transformer forward (the wrapped denoiser)",
    "backward": "backward (and gradient all-reduce when distributed)",
    "optimizer": "grad clip + optimizer.step + lr scheduler + zero_grad",
    "logging": "the loss / grad-norm host read done at log intervals",
    "other": "timesteps, noise, packing, position ids, loss",
}


def contention_warning(cores: int) -> Optional[str]:
    """A warning when other work already loads the machine (1-minute load average above the core count): timings
    taken now are inflated and noisy."""
    load = os.getloadavg()[0]
    if load <= cores:
        return None
    return (f"the 1-minute load average is {load:.1f} on {cores} cores before the benchmark starts: other processes "
            "compete for the CPU, so timings will be slower and noisier than on a quiet machine")


def peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU by name, or None when it is not in PEAK_BF16_TFLOPS."""
    name = device_name.lower()
    for words, peak in PEAK_BF16_TFLOPS:
        if all(w in name for w in words):
            return peak
    return None


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one transformer call, split the way the backward convention needs."""

    frozen_linear: int
    trainable_linear: int
    attention: int
    attention_calls: int  # scaled_dot_product_attention calls per forward (0: another attention path)
    tokens_per_sample: int  # the longest attention sequence (text + image tokens for FLUX)

    @property
    def forward(self) -> int:
        return self.frozen_linear + self.trainable_linear + self.attention

    @property
    def train_step(self) -> int:
        """Forward + backward FLOPs per the module docstring's convention."""
        return 2 * self.frozen_linear + 3 * self.trainable_linear + 3 * self.attention


@contextmanager
def _counting_sdpa(counts: dict) -> Iterator[None]:
    """Route F.scaled_dot_product_attention through a counter (looked up at call time by diffusers' native path)."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def counted(query, key, value, *args, **kwargs):
        heads_x_batch = math.prod(query.shape[:-2])
        lq, d = query.shape[-2:]
        counts["attention"] += 2 * heads_x_batch * lq * key.shape[-2] * (d + value.shape[-1])
        counts["calls"] += 1
        counts["seq"] = max(counts["seq"], int(lq))
        return original(query, key, value, *args, **kwargs)

    functional.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def count_flops(module: torch.nn.Module, inputs: Mapping[str, Any], batch_size: int) -> FlopCount:
    """Run `module(**inputs)` once without grad and count its FLOPs (see the module docstring)."""
    counts = {"frozen": 0, "trainable": 0, "attention": 0, "calls": 0, "seq": 0, "rows": 0}

    def on_linear(layer: torch.nn.Linear, args: tuple) -> None:
        rows = args[0].numel() // layer.in_features
        kind = "trainable" if layer.weight.requires_grad else "frozen"
        counts[kind] += 2 * rows * layer.in_features * layer.out_features
        counts["rows"] = max(counts["rows"], rows)

    handles = [m.register_forward_pre_hook(on_linear) for m in module.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad(), _counting_sdpa(counts):
            module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    tokens = counts["seq"] or counts["rows"] // max(1, batch_size)
    return FlopCount(counts["frozen"], counts["trainable"], counts["attention"], counts["calls"], tokens)


def _fmt_s(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds:.4f}"


def _fmt_num(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{unit}"


def format_table(r: Mapping[str, Any]) -> str:
    """The human-readable report of a tools.bench result dict."""
    step = r["step_seconds_median"]
    lines = [
        f"config {r['config']} | model {r['model']}",
        f"device {r['device']} ({r['device_name']}) | dtype {r['dtype']} | world size {r['world_size']} | "
        f"torch threads {r['torch_threads']} | batch {r['batch_size']} x accumulation "
        f"{r['gradient_accumulation_steps']}",
        f"transformer {r['transformer_params'] / 1e6:.1f}M params, LoRA {r['trainable_params'] / 1e6:.2f}M trainable"
        f" | tokens/sample {r['tokens_per_sample']} (range {r['tokens_per_sample_range'][0]}-"
        f"{r['tokens_per_sample_range'][1]}) | setup {r['setup_seconds']:.1f} s",
        "",
        f"optimizer step (real, {r['measured_steps']} steps after {r['warmup_steps']} warm-up): median "
        f"{step:.4f} s, min {r['step_seconds_min']:.4f}, max {r['step_seconds_max']:.4f} | "
        f"{r['samples_per_second']:.2f} samples/s",
        "",
        f"{'phase':<12} {'s/step':>9} {'share':>7}  what",
    ]
    total = r["instrumented_step_seconds"]
    for phase in PHASES:
        seconds = r["breakdown_seconds"][phase]
        lines.append(f"{phase:<12} {seconds:>9.4f} {100 * seconds / total:>6.1f}%  {PHASE_HELP[phase]}")
    lines += [
        f"{'total':<12} {total:>9.4f} {100.0:>6.1f}%  instrumented step = {r['instrumented_vs_real']:.2f} x the "
        "real step (same batch shapes)",
        f"encoders: {r.get('encoder_seconds', 0.0):.4f} s/step; loaded by the end: "
        f"{', '.join(r.get('encoders_loaded') or []) or 'none'}",
        "",
        f"reference (bare transformer fwd + bwd + optimizer on the same tensors): median "
        f"{r['reference_step_seconds_median']:.4f} s | overhead ratio {r['overhead_ratio']:.3f} "
        f"(goal <= {r['overhead_goal']:.2f})",
        f"peak RSS {r['peak_rss_mib']:.0f} MiB | GPU peak allocated {_fmt_num(r['peak_gpu_allocated_mib'], ' MiB', 0)}"
        f" | attention calls/forward via SDPA {r['sdpa_calls_per_forward']}",
        f"transformer FLOPs/step {r['flops_per_step']:.3e} | achieved {_fmt_num(r['achieved_tflops'], ' TFLOP/s', 2)}"
        f" | peak {_fmt_num(r['peak_tflops'], ' TFLOP/s', 0)} | MFU {_fmt_num(r['mfu'], '', 3)}",
    ]
    if r.get("contention_warning"):
        lines.append(f"WARNING before the start: {r['contention_warning']}")
    if r["device"] == "cpu" and r["load_average_1min"] > r["cpu_cores"]:
        lines.append(f"WARNING: load average {r['load_average_1min']:.1f} > {r['cpu_cores']} cores: other processes "
                     "shared the CPU, these timings are not reliable")
    return "\n".join(lines)


__all__ = ["FlopCount", "PEAK_BF16_TFLOPS", "PHASES", "contention_warning", "count_flops", "format_table",
           "peak_tflops"]

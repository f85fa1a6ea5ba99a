"""The memory plan as text: parts, the two peaks, the verdict, and the advice (each change alone, then together)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from toolkit.plan.planner import GiB, MemoryPlan, Options

VERDICT_FITS, VERDICT_NO = "FITS", "DOES NOT FIT"


def variants(opts: Options) -> list[tuple[str, Options]]:
    """The memory-saving changes that apply to `opts`, each alone, and all of them together (last)."""
    found: list[tuple[str, dict]] = []
    if not opts.quantize:
        found.append(("model.quantize: true (qfloat8)", {"quantize": True, "qtype": "qfloat8"}))
        found.append(("model.quantize + model.low_vram (quantized block by block)",
                      {"quantize": True, "qtype": "qfloat8", "low_vram": True}))
    elif not opts.low_vram:
        found.append(("model.low_vram: true (quantized block by block)", {"low_vram": True}))
    if not opts.quantize_te:
        found.append(("model.quantize_te: true (8-bit T5, also while loading)", {"quantize_te": True}))
    if not opts.checkpointing:
        found.append(("train.gradient_checkpointing: true", {"checkpointing": True}))
    if not opts.text_cached:
        found.append(("train.cache_text_embeddings: true", {"text_cached": True}))
    if opts.optimizer in ("adamw", "adam", "prodigy"):
        found.append(("train.optimizer: adamw8bit", {"optimizer": "adamw8bit", "optimizer_params": ()}))
    if opts.ema:
        found.append(("train.ema_config.ema_on_cpu: true", {"ema": False}))
    if opts.batch > 1:
        found.append(("train.batch_size: 1", {"batch": 1}))
    if opts.controls and opts.control_side == 1.0:
        found.append(("control images at half the target's side (1/4 of the control tokens)", {"control_side": 0.5}))
    lower = max(256, int(opts.resolution * 0.75) // 64 * 64)
    if lower < opts.resolution:
        found.append((f"resolution: [{lower}] (largest bucket)", {"resolution": lower}))
    out = [(label, replace(opts, **change)) for label, change in found]
    if len(found) > 1:
        together: dict = {}
        for _, change in found:
            together.update(change)
        out.append(("all of the above", replace(opts, **together)))
    return out


def gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f}" if nbytes >= GiB // 10 or nbytes == 0 else f"{nbytes / GiB:.5f}"


def describe(plan: MemoryPlan) -> str:
    o = plan.options
    target, control, text = plan.tokens
    dtype = str(o.dtype).replace("torch.", "")
    return (f"{dtype} compute, largest bucket {o.resolution}x{o.resolution} px, batch {o.batch}: tokens per item "
            f"{target} target + {control} control + {text} text = {target + control + text}")


def format_plan(plan: MemoryPlan, title: str, advice: Optional[list[tuple[str, MemoryPlan]]] = None) -> str:
    lines = [f"Memory plan: {title}", f"  {describe(plan)}", f"  {'part':<46}{'GiB':>9}  note"]
    lines += [f"  {p.name:<46}{gib(p.nbytes):>9}  {p.note}" for p in plan.parts]
    other = "off" if plan.options.checkpointing else "on"
    lines += [f"  {'training peak':<46}{gib(plan.train_peak):>9}",
              f"  {'loading peak':<46}{gib(plan.load_peak):>9}  {plan.load_note}",
              f"  (activations with gradient checkpointing {other}: {gib(plan.activations_other)} GiB)",
              f"  peak: {gib(plan.peak)} GiB"]
    if plan.gpu_bytes is not None:
        verdict = VERDICT_FITS if plan.fits else VERDICT_NO
        lines.append(f"Verdict: {verdict} in {gib(plan.gpu_bytes)} GiB "
                     f"({'free' if plan.fits else 'short'}: {gib(abs(plan.gpu_bytes - plan.peak))} GiB)")
    if advice:
        lines.append("Advice (each change alone, then all together; peak GiB):")
        for label, alt in advice:
            mark = "" if alt.fits is None else ("  fits" if alt.fits else "  does not fit")
            lines.append(f"  {label:<72}{gib(alt.peak):>9}{mark}")
    return "\n".join(lines)


def advise(plan: MemoryPlan, plan_of: Callable[[Options], MemoryPlan]) -> list[tuple[str, MemoryPlan]]:
    """Plans of each variant of `plan`'s options (`plan_of` plans one set of options)."""
    return [(label, plan_of(opts)) for label, opts in variants(plan.options)]

"""LoRA files in the two layouts Kontext tools load, and exact conversion between them.

`diffusers` (what we train and save by default; diffusers, ComfyUI and ai-toolkit load it):
    transformer.<module>.lora_A.weight (rank x in), .lora_B.weight (out x rank); the update is
    B @ A * lora_alpha / r, with r and lora_alpha in the JSON header `lora_adapter_metadata`.
`comfy` (kohya sd-scripts layout; ComfyUI, Forge, SwarmUI, sd-scripts and diffusers' kohya converter load it):
    lora_unet_<module>.lora_down.weight (rank x in), .lora_up.weight (out x rank), .alpha (scalar); the update is
    up @ down * alpha / rank. <module> is the name in the model's ORIGINAL checkpoint with dots as underscores.

Why the original names: ComfyUI keeps FLUX in BFL's own layout and maps `lora_unet_<name>` only onto its real
state-dict keys, so `lora_unet_double_blocks_0_img_attn_qkv` loads while diffusers names behind `lora_unet_`
(`lora_unet_transformer_blocks_0_attn_to_q`) are silently skipped. BFL fuses some linears that diffusers keeps
apart (FLUX: q, k, v -> img_attn.qkv; q, k, v, mlp -> single_blocks.N.linear1). A LoRA on each part becomes ONE
exact LoRA on the fused linear: down = the parts' A stacked (rank = sum of ranks), up = the parts' B on the block
diagonal, alpha = scale * fused rank. Converting back cuts the blocks out again (bit-identical tensors);
diffusers' own kohya converter recognises the same block-diagonal ("sparse") form. A fused module whose LoRA
covers only some parts gets zero blocks for the others, dropped again on the way back (a trained A is never
exactly zero).

Which modules fuse is architecture knowledge: an extension registers its `LoraConventions` by architecture name.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from toolkit.state.atomic import atomic_write_bytes
from toolkit.errors import UserError
from toolkit.registry import Registry
from toolkit.adapters.lora import LORA_METADATA_KEY, PREFIX, adapter_metadata

LoraFormat = Literal["diffusers", "comfy"]
COMFY_PREFIX = "lora_unet_"
_A, _B = ".lora_A.weight", ".lora_B.weight"
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass(frozen=True)
class FusedModule:
    """A linear of the original layout made of diffusers linears `parts`, stacked along the output in this order.

    Names are templates: `{i}` stands for a block index. `part_ratios` gives the parts' relative output sizes
    (empty: equal), needed to rebuild a part the LoRA does not cover. `swap_halves`: the two output halves are
    stored in the opposite order (FLUX's final modulation is (shift, scale) in BFL and (scale, shift) in diffusers).
    """

    original: str
    parts: tuple[str, ...]
    part_ratios: tuple[int, ...] = ()
    swap_halves: bool = False


@dataclass(frozen=True)
class LoraConventions:
    """How one architecture's LoRA files look outside diffusers, and what ecosystem metadata names it."""

    modules: tuple[FusedModule, ...]
    modelspec_architecture: str  # e.g. "flux-1-dev"; LoRA files get "<this>/lora"
    modelspec_implementation: str
    base_model_version: str  # kohya's ss_base_model_version

    def _patterns(self) -> tuple[list, list]:
        to_orig, from_orig = [], []
        for module in self.modules:
            for j, part in enumerate(module.parts):
                to_orig.append((_template_regex(part), module, j))
            from_orig.append((_template_regex(COMFY_PREFIX + module.original.replace(".", "_")), module))
        return to_orig, from_orig


_CONVENTIONS: Registry[LoraConventions] = Registry(
    lambda name, known: UserError(f"no LoRA file conventions for architecture {name!r} (known: {known})"))


def register_conventions(arch_name: str, conventions: LoraConventions) -> None:
    _CONVENTIONS.add(arch_name, conventions)


def find_conventions(arch_name: str) -> Optional[LoraConventions]:
    return _CONVENTIONS.find(arch_name)


def get_conventions(arch_name: str) -> LoraConventions:
    return _CONVENTIONS.get(arch_name)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _fill(template: str, index: Optional[str]) -> str:
    return template.replace("{i}", index) if index is not None else template


# ---------------------------------------------------------------------------------------------------- reading


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a LoRA .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
    return load_file(str(path)), header


def detect_format(keys) -> Optional[LoraFormat]:
    """`diffusers`, `comfy`, or None for a layout we do not convert (diffusers' own loader may still know it)."""
    keys = list(keys)
    if keys and all(k.startswith(PREFIX + ".") for k in keys) and any(k.endswith(_A) for k in keys):
        return "diffusers"
    if keys and all(k.startswith(COMFY_PREFIX) for k in keys) and any(k.endswith(_DOWN) for k in keys):
        return "comfy"
    return None


def peft_metadata(header: Mapping[str, str]) -> Optional[dict]:
    """The `lora_adapter_metadata` JSON (LoraConfig fields under `transformer.` keys), or None."""
    raw = header.get(LORA_METADATA_KEY)
    return json.loads(raw) if raw else None


def _module_scales(state: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> dict[str, float]:
    """alpha / r of every module of a diffusers-layout state, as peft would compute it from the metadata."""
    from peft.utils.other import get_pattern_key

    meta = {k[len(PREFIX) + 1:]: v for k, v in (peft_metadata(header) or {}).items() if k.startswith(PREFIX + ".")}
    alpha_pattern = meta.get("alpha_pattern") or {}
    scales = {}
    for key, tensor in state.items():
        if not key.endswith(_A):
            continue
        module = key[len(PREFIX) + 1:-len(_A)]
        rank = tensor.shape[0]
        # Without metadata diffusers loads with alpha = rank (scale 1).
        alpha = float(meta.get("lora_alpha", rank))
        if alpha_pattern:
            alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha))
        scales[module] = alpha / (rank ** 0.5 if meta.get("use_rslora") else rank)
    return scales


# ---------------------------------------------------------------------------------------- diffusers -> comfy


def to_comfy(state: Mapping[str, torch.Tensor], header: Mapping[str, str], conventions: LoraConventions
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers-layout LoRA as kohya/ComfyUI tensors and header (ecosystem and trainer metadata are kept)."""
    if detect_format(state) != "diffusers":
        raise UserError("to_comfy: the input is not a diffusers-layout LoRA (transformer.*.lora_A/B.weight)")
    odd = [k for k in state if not k.endswith((_A, _B))]
    if odd:
        raise UserError(f"to_comfy: unsupported LoRA tensors (only lora_A/lora_B weights convert): {odd[:5]}")
    scales = _module_scales(state, header)
    to_orig, _ = conventions._patterns()
    groups: dict[tuple[str, Optional[str]], dict[int, str]] = {}
    unknown = []
    for module in scales:
        for regex, fused, j in to_orig:
            m = regex.match(module)
            if m:
                groups.setdefault((fused.original, m.group(1) if m.groups() else None), {})[j] = module
                break
        else:
            unknown.append(module)
    if unknown:
        raise UserError(f"no ComfyUI/kohya name for LoRA module(s) {', '.join(sorted(unknown)[:5])}")
    by_name = {m.original: m for m in conventions.modules}
    out: dict[str, torch.Tensor] = {}
    for (original, index), members in sorted(groups.items()):
        fused = by_name[original]
        down, up, alpha = _fuse(fused, members, state, scales)
        name = COMFY_PREFIX + _fill(original, index).replace(".", "_")
        out[name + _DOWN], out[name + _UP] = down, up
        out[name + _ALPHA] = torch.tensor(alpha, dtype=torch.float32)
    kept = {k: v for k, v in header.items() if k != LORA_METADATA_KEY}
    return out, kept


def _fuse(fused: FusedModule, members: dict[int, str], state, scales) -> tuple[torch.Tensor, torch.Tensor, float]:
    """down, up and alpha of one original-layout module from its diffusers parts (missing parts are zero)."""
    present = sorted(members)
    first_a, first_b = state[f"{PREFIX}.{members[present[0]]}{_A}"], state[f"{PREFIX}.{members[present[0]]}{_B}"]
    ratios = fused.part_ratios or (1,) * len(fused.parts)
    unit = first_b.shape[0] // ratios[present[0]]
    downs, ups, scale = [], [], None
    for j in range(len(fused.parts)):
        if j in members:
            a, b = state[f"{PREFIX}.{members[j]}{_A}"], state[f"{PREFIX}.{members[j]}{_B}"]
            if scale is not None and abs(scales[members[j]] - scale) > 1e-6 * abs(scale):
                raise UserError(f"LoRA parts of {fused.original} have different alpha/rank scales; "
                                "the fused kohya layout needs one")
            scale = scales[members[j]]
        else:
            a = torch.zeros_like(first_a)
            b = torch.zeros((unit * ratios[j], first_a.shape[0]), dtype=first_b.dtype)
        downs.append(a)
        ups.append(b)
    down, up = torch.cat(downs, 0), torch.block_diag(*ups)
    if fused.swap_halves:
        up = _swap_halves(up)
    return down.contiguous(), up.contiguous(), scale * down.shape[0]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ---------------------------------------------------------------------------------------- comfy -> diffusers


def to_diffusers(state: Mapping[str, torch.Tensor], header: Mapping[str, str], conventions: LoraConventions
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya/ComfyUI LoRA as diffusers tensors plus a `lora_adapter_metadata` header diffusers loads exactly."""
    if detect_format(state) != "comfy":
        raise UserError("to_diffusers: the input is not a kohya/ComfyUI LoRA (lora_unet_*.lora_down/up.weight)")
    odd = [k for k in state if not k.endswith((_DOWN, _UP, _ALPHA))]
    if odd:
        raise UserError(f"to_diffusers: unsupported LoRA tensors (only lora_down/lora_up/alpha convert): {odd[:5]}")
    _, from_orig = conventions._patterns()
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # module -> (A, B, scale)
    unknown = []
    for key in sorted(k for k in state if k.endswith(_DOWN)):
        name = key[:-len(_DOWN)]
        for regex, fused in from_orig:
            m = regex.match(name)
            if m:
                index = m.group(1) if m.groups() else None
                down, up = state[key], state[name + _UP]
                alpha = float(state[name + _ALPHA]) if name + _ALPHA in state else float(down.shape[0])
                parts.update(_split(fused, index, down, up, alpha / down.shape[0]))
                break
        else:
            unknown.append(name)
    if unknown:
        raise UserError(f"unknown kohya/ComfyUI LoRA module(s) {', '.join(unknown[:5])}")
    tensors, config = _diffusers_tensors(parts)
    kept = dict(header)
    kept[LORA_METADATA_KEY] = json.dumps(adapter_metadata(config), indent=2, sort_keys=True, default=str)
    return tensors, kept


def _split(fused: FusedModule, index: Optional[str], down: torch.Tensor, up: torch.Tensor, scale: float
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The diffusers parts of one original-layout LoRA: block-diagonal ones are cut apart exactly, dense ones
    (trained fused, e.g. by sd-scripts) give every part the whole down and its rows of up."""
    if fused.swap_halves:
        up = _swap_halves(up)
    n = len(fused.parts)
    ratios = fused.part_ratios or (1,) * n
    unit, rest = divmod(up.shape[0], sum(ratios))
    if rest:
        raise UserError(f"{fused.original}: output size {up.shape[0]} does not split in parts {ratios}")
    rows = [unit * r for r in ratios]
    rank = down.shape[0]
    blocks = [(sum(rows[:j]), rows[j]) for j in range(n)]
    sparse = rank % n == 0 and all(
        not up[start:start + size, k * rank // n:(k + 1) * rank // n].any()
        for j, (start, size) in enumerate(blocks) for k in range(n) if k != j)
    out = {}
    for j, (start, size) in enumerate(blocks):
        if sparse:
            a = down[j * rank // n:(j + 1) * rank // n]
            b = up[start:start + size, j * rank // n:(j + 1) * rank // n]
            if n > 1 and not a.any():  # a part to_comfy filled with zeros: the LoRA never covered it
                continue
        else:
            a, b = down, up[start:start + size]
        out[_fill(fused.parts[j], index)] = (a.contiguous(), b.contiguous(), scale)
    return out


def _diffusers_tensors(parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """Tensors and one LoraConfig for modules with per-module (A, B, scale).

    The commonest rank and scale become r and lora_alpha; other ranks go in rank_pattern, and a module whose scale
    peft would then get wrong has the difference multiplied into its B (exact, and never needed for our own files).
    """
    from peft import LoraConfig

    rank = Counter(a.shape[0] for a, _, _ in parts.values()).most_common(1)[0][0]
    scale = Counter(round(s, 9) for _, _, s in parts.values()).most_common(1)[0][0]
    alpha = scale * rank
    tensors, rank_pattern = {}, {}
    for module, (a, b, s) in sorted(parts.items()):
        r = a.shape[0]
        if r != rank:
            rank_pattern[module] = r
        peft_scale = alpha / r
        if abs(peft_scale - s) > 1e-9 * abs(s):
            b = (b.float() * (s / peft_scale)).to(b.dtype)
        tensors[f"{PREFIX}.{module}{_A}"], tensors[f"{PREFIX}.{module}{_B}"] = a, b
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(parts), rank_pattern=rank_pattern)
    return tensors, config


# ---------------------------------------------------------------------------------------------------- files


def convert_state(state, header, to: LoraFormat, conventions: LoraConventions):
    """Tensors and header in layout `to`; a LoRA already in that layout comes back unchanged."""
    current = detect_format(state)
    if current is None:
        raise UserError("not a LoRA layout this tool converts (expected transformer.*.lora_A/B.weight "
                        "or lora_unet_*.lora_down/up.weight)")
    if current == to:
        return dict(state), dict(header)
    return (to_comfy if to == "comfy" else to_diffusers)(state, header, conventions)


def convert_file(src: Path, dst: Path, to: LoraFormat, conventions: LoraConventions) -> Path:
    """Convert a LoRA file to layout `to`, writing `dst` atomically (dtype of the tensors is kept)."""
    state, header = read_lora(src)
    tensors, meta = convert_state(state, header, to, conventions)
    atomic_write_bytes(Path(dst), safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return Path(dst)


__all__ = ["COMFY_PREFIX", "FusedModule", "LoraConventions", "LoraFormat", "convert_file", "convert_state",
           "detect_format", "find_conventions", "get_conventions", "peft_metadata", "read_lora",
           "register_conventions", "to_comfy", "to_diffusers"]

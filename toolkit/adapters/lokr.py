"""LoKr through peft (LoKrConfig / LoKrLayer) and the .safetensors layout ComfyUI and LyCORIS load.

peft's layer: update = kron(w1, w2) * alpha / r, where w1 is a full matrix (or w1_a @ w1_b) and w2 is a full
matrix when r >= half its larger side, else w2_a @ w2_b (rank r). `decompose_factor` (our `lokr_factor`) picks the
Kronecker split of each layer's sizes.

File layout (ComfyUI comfy/weight_adapter/lokr.py, LyCORIS): per module `<name>.lokr_w1` or `.lokr_w1_a/_b`,
`.lokr_w2` or `.lokr_w2_a/_b`, and `.alpha`. ComfyUI scales by alpha / dim only when a factor is low-rank (dim =
the rank of that split); with both factors full it applies kron(w1, w2) unscaled. So a file written here stores
alpha = scale x dim for a split factor, and multiplies the scale into w2 when both are full (alpha = r then, as
LyCORIS writes it). Reading reverses this for whatever r and alpha the run uses, so the update is the same.

Names: `transformer.<diffusers module>` (save.format diffusers) or `lycoris_<module with _>` (save.format comfy,
SimpleTuner/LyCORIS naming); ComfyUI maps both onto FLUX's weights, including the fused qkv slices.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence, Union

import torch
from peft import LoKrConfig

from toolkit.errors import UserError

PREFIXES = {"diffusers": "transformer.", "comfy": "lycoris_"}
FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ALPHA = "alpha"
FULL_RANK = 1_000_000_000  # ai-toolkit's lokr_full_rank: a rank no layer reaches, so peft keeps both factors full


def make_lokr_config(rank: int, alpha: float, target_modules: Union[str, Sequence[str]], factor: int = -1,
                     full_rank: bool = False) -> LoKrConfig:
    """peft config; w1 starts at zero, so training starts from the base model."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if full_rank:
        rank = alpha = FULL_RANK  # scale 1
    return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=factor)


def split_key(key: str) -> tuple[str, str]:
    """`a.b.lokr_w1` -> (`a.b`, `lokr_w1`)."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def group_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {leaf: tensor}} of a flat LoKr state (peft's or a file's, prefix included)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, leaf = split_key(key)
        groups.setdefault(module, {})[leaf] = tensor
    return groups


def file_scale(tensors: Mapping[str, torch.Tensor]) -> float:
    """The scale ComfyUI applies to kron(w1, w2) of one module of a file."""
    dim = None
    if "lokr_w1_b" in tensors:
        dim = tensors["lokr_w1_b"].shape[0]
    if "lokr_w2_b" in tensors:
        dim = tensors["lokr_w2_b"].shape[0]
    if dim is None or ALPHA not in tensors:
        return 1.0
    return float(tensors[ALPHA]) / dim


def factor_product(tensors: Mapping[str, torch.Tensor], which: str) -> torch.Tensor:
    """w1 or w2 of one module (`which` is "lokr_w1" or "lokr_w2"), multiplied out when split."""
    if which in tensors:
        return tensors[which].float()
    return tensors[which + "_a"].float() @ tensors[which + "_b"].float()


def delta_from_file(tensors: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The weight update ComfyUI adds for one module of a file: kron(w1, w2) * file_scale, as `shape`."""
    w1, w2 = factor_product(tensors, "lokr_w1"), factor_product(tensors, "lokr_w2")
    return (torch.kron(w1, w2) * file_scale(tensors)).reshape(shape)


def _w2_scaled(tensors: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    key = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_a"
    out = dict(tensors)
    if factor != 1.0:
        out[key] = (tensors[key].float() * factor).to(tensors[key].dtype)
    return out


def to_file(state: Mapping[str, torch.Tensor], rank: int, alpha: float, layout: str = "diffusers"
            ) -> dict[str, torch.Tensor]:
    """peft LoKr tensors (keys `<module>.lokr_*`, as get_peft_model_state_dict gives them) in the file layout;
    `rank` and `alpha` are the peft config's (scale alpha / rank)."""
    prefix, scale = PREFIXES[layout], alpha / rank
    out: dict[str, torch.Tensor] = {}
    for module, tensors in sorted(group_modules(state).items()):
        name = prefix + (module if layout == "diffusers" else module.replace(".", "_"))
        split = [tensors[leaf].shape[0] for leaf in ("lokr_w2_b", "lokr_w1_b") if leaf in tensors]
        if split:
            file_alpha = scale * split[0]  # ComfyUI: alpha / dim, dim = the rank of the split factor
        else:
            tensors, file_alpha = _w2_scaled(tensors, scale), float(rank)  # full factors: applied unscaled
        for leaf, tensor in tensors.items():
            out[f"{name}.{leaf}"] = tensor
        out[f"{name}.{ALPHA}"] = torch.tensor(float(file_alpha))
    return out


def module_names(file_state: Mapping[str, torch.Tensor], known: Sequence[str]) -> dict[str, str]:
    """{file module name: model module name} for the modules of a LoKr file; unknown names map to themselves."""
    by_underscore = {m.replace(".", "_"): m for m in known}
    names = {}
    for module in group_modules(file_state):
        if module.startswith(PREFIXES["diffusers"]):
            names[module] = module[len(PREFIXES["diffusers"]):]
        elif module.startswith(PREFIXES["comfy"]):
            names[module] = by_underscore.get(module[len(PREFIXES["comfy"]):], module)
        else:
            names[module] = module
    return names


def from_file(file_state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], scale: float,
              source: str) -> dict[str, torch.Tensor]:
    """A LoKr file's tensors as peft tensors for a network whose own state is `expected` and scale `scale`
    (alpha / r); the update kron(w1, w2) * scale equals the file's. Mismatched modules or shapes raise UserError
    naming both sides."""
    want = group_modules(expected)
    names = module_names(file_state, list(want))
    groups = {names[m]: t for m, t in group_modules(file_state).items()}
    extra = sorted(set(groups) - set(want))
    missing = sorted(set(want) - set(groups))
    if extra or missing:
        raise UserError(_module_mismatch(source, extra, missing))
    out: dict[str, torch.Tensor] = {}
    for module, tensors in sorted(groups.items()):
        factors = {leaf: t for leaf, t in tensors.items() if leaf in FACTORS}
        theirs = {leaf: tuple(t.shape) for leaf, t in factors.items()}
        ours = {leaf: tuple(t.shape) for leaf, t in want[module].items()}
        if theirs != ours:
            raise UserError(f"{source}: LoKr shapes of {module} do not match this network: the file has "
                            f"{_shapes(theirs)}, network.linear / lokr_factor / lokr_full_rank give {_shapes(ours)}")
        adjusted = _w2_scaled(factors, file_scale(tensors) / scale)
        out.update({f"{module}.{leaf}": t for leaf, t in adjusted.items()})
    return out


def _shapes(shapes: Mapping[str, tuple]) -> str:
    return ", ".join(f"{leaf} {tuple(shape)}" for leaf, shape in sorted(shapes.items()))


def _module_mismatch(source: str, extra: list[str], missing: list[str]) -> str:
    parts = []
    if extra:
        parts.append(f"it has weights for {len(extra)} module(s) this network does not train (e.g. "
                     f"{', '.join(extra[:4])}): add them to network.target_modules")
    if missing:
        parts.append(f"it lacks {len(missing)} module(s) this network trains (e.g. {', '.join(missing[:4])}): "
                     "set network.target_modules to the file's modules")
    return f"{source}: the adapter's modules do not match this network: " + "; ".join(parts)


# Which LyCORIS network class loads each layout by name: lycoris.wrapper's LycorisNetwork (create_lycoris_from_weights
# on the diffusers transformer) matches `lycoris_<module with _>`. `lycoris.kohya` is sd-scripts' integration, which
# names modules `lora_unet_<original checkpoint name>`: none of our layouts. Nothing loads `transformer.*` LoKr names
# by module (ComfyUI and ai-toolkit match the keys themselves), so that layout claims no module.
NETWORK_MODULES = {"comfy": "lycoris.wrapper"}


def ecosystem_metadata(factor: int, full_rank: bool, layout: str) -> dict[str, str]:
    """What kohya/LyCORIS tools read to tell a LoKr file apart: the algorithm and its factor, and the LyCORIS module
    whose key names the file (`layout`, as to_file) really has."""
    meta = {"ss_network_args": json.dumps({"algo": "lokr", "factor": str(factor),
                                           "full_matrix": str(full_rank).lower()})}
    if layout in NETWORK_MODULES:
        meta["ss_network_module"] = NETWORK_MODULES[layout]
    return meta


def is_lokr_state(keys) -> bool:
    """True when the keys are LoKr factors (plus alphas), False when they hold none."""
    return any(split_key(k)[1] in FACTORS for k in keys)


__all__ = ["FACTORS", "FULL_RANK", "PREFIXES", "delta_from_file", "ecosystem_metadata", "factor_product",
           "file_scale", "from_file", "group_modules", "is_lokr_state", "make_lokr_config", "module_names",
           "to_file"]

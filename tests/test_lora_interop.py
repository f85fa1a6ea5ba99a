"""The default LoRA file (diffusers keys) trained with linear_alpha != linear gives exactly the trained update in
ComfyUI (re-implemented below), in diffusers' load_lora_weights, and in this trainer's own readers
(network.pretrained_lora, convert-lora both ways, generate/compare's renderer)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxKontextPipeline
from safetensors.torch import load_file, save_file

import run
from extensions.flux_kontext import FluxKontext
from jobs import get_job
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.adapters.lora import add_lora, make_lora_config, read_lora_metadata
from toolkit.adapters.lora_convert import find_conventions
from toolkit.adapters.network import load_pretrained

RANK, ALPHA = 4, 2  # scale 0.5: a file read at scale 1 is off by 2x


# ---------------------------------------------------------------- ComfyUI's LoRA loading, written out for FLUX


def comfy_flux_targets(hidden: int, double: int, single: int) -> dict[str, tuple[str, int]]:
    """ComfyUI's names for a diffusers-format FLUX LoRA (comfy/lora.py model_lora_keys_unet, Flux branch, with the
    table of comfy.utils.flux_to_diffusers): `transformer.<diffusers module>` -> (BFL weight, first output row).
    Only linears LoRAs train are listed; ComfyUI's table also has biases and norms."""
    out: dict[str, tuple[str, int]] = {}
    for i in range(double):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            out[f"{src}.attn.{img}"] = (f"{dst}.img_attn.qkv", j * hidden)
            out[f"{src}.attn.{txt}"] = (f"{dst}.txt_attn.qkv", j * hidden)
        for ours, theirs in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                             ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                             ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                             ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
            out[f"{src}.{ours}"] = (f"{dst}.{theirs}", 0)
    for i in range(single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
            out[f"{src}.{name}"] = (f"{dst}.linear1", j * hidden)
        out[f"{src}.proj_out"] = (f"{dst}.linear2", 0)
        out[f"{src}.norm.linear"] = (f"{dst}.modulation.lin", 0)
    return {f"transformer.{k}": v for k, v in out.items()}


def comfy_weight_changes(file_state: dict, targets: dict[str, tuple[str, int]]
                         ) -> tuple[dict[tuple[str, int], torch.Tensor], list[str]]:
    """What ComfyUI adds to each weight (strength 1): for every known name x with `x.lora_B.weight` (up) and
    `x.lora_A.weight` (down), up @ down * alpha / rank, alpha from `x.alpha` and the scale 1 when there is none
    (comfy/weight_adapter/lora.py). Returns {(BFL weight, first row): change} and the keys it never read."""
    changes, read = {}, set()
    for name, target in targets.items():
        up_key, down_key, alpha_key = f"{name}.lora_B.weight", f"{name}.lora_A.weight", f"{name}.alpha"
        if up_key not in file_state:
            continue
        up, down = file_state[up_key].float(), file_state[down_key].float()
        scale = float(file_state[alpha_key]) / down.shape[0] if alpha_key in file_state else 1.0
        changes[target] = up @ down * scale
        read |= {up_key, down_key} | ({alpha_key} if alpha_key in file_state else set())
    return changes, sorted(set(file_state) - read)


def peft_changes(transformer, adapter: str = "default") -> dict[str, torch.Tensor]:
    """B @ A * alpha / r of every LoRA layer of `adapter`: the update peft adds, by diffusers module name."""
    return {name: (m.lora_B[adapter].weight @ m.lora_A[adapter].weight * m.scaling[adapter]).detach().float()
            for name, m in transformer.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


def assert_same_changes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, change in want.items():
        torch.testing.assert_close(got[name], change, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """3 steps at linear 4, linear_alpha 2, the default save.format; the trained model and its update kept."""
    folder = tmp_path_factory.mktemp("interop")
    cfg = merge(tiny_config_dict(folder / "out", tiny_model_dir, demo_data_dir),
                {"network.linear": RANK, "network.linear_alpha": ALPHA, "train.steps": 3, "train.lr": 1e-2,
                 "save.save_every": 1000, "sample.prompts": []})
    job = get_job(write_config(folder / "cfg.yaml", cfg))
    process = job.processes[0]
    captured = {}
    original_load = process.arch_cls.load

    def load_and_remember(*args, **kwargs):
        captured["model"] = original_load(*args, **kwargs)
        return captured["model"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(process.arch_cls, "load", load_and_remember)
        final = job.run()[0]
    changes = peft_changes(captured["model"].transformer)
    assert changes and all(c.abs().max() > 0 for c in changes.values()), "training changed nothing"
    return dict(final=final, changes=changes, folder=folder)


def test_comfyui_reads_the_trained_update(trained, tiny_model_dir):
    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    targets = comfy_flux_targets(hidden, config["num_layers"], config["num_single_layers"])
    state = load_file(str(trained["final"]))
    got, unread = comfy_weight_changes(state, targets)
    assert unread == []  # ComfyUI logs "lora key not loaded" for these
    reverse = {target: name[len("transformer."):] for name, target in targets.items()}
    assert_same_changes({reverse[target]: change for target, change in got.items()}, trained["changes"])
    meta = read_lora_metadata(trained["final"])
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == RANK  # the scale is in lora_B
    assert float(meta["kontext_trainer.alpha"]) == ALPHA and meta["ss_network_alpha"] == str(ALPHA)


def test_diffusers_load_lora_weights_reads_the_trained_update(trained, tiny_model_dir):
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pipe.load_lora_weights(str(trained["final"]), adapter_name="trained")
    assert_same_changes(peft_changes(pipe.transformer, "trained"), trained["changes"])


def test_alpha_tensors_are_no_option_diffusers_refuses_them_beside_the_metadata(trained, tiny_model_dir, tmp_path):
    """Why the scale is folded into lora_B instead of written as kohya-style `.alpha` tensors."""
    state = load_file(str(trained["final"]))
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        state[key[:-len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(RANK))
    path = tmp_path / "with_alphas.safetensors"
    save_file(state, str(path), metadata=read_lora_metadata(trained["final"]))
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with pytest.raises(ValueError, match="network_alphas.*metadata"):
        pipe.load_lora_weights(str(path))


def test_our_readers_keep_the_trained_update(trained, tiny_model_dir):
    """network.pretrained_lora (at this run's alpha and at another), convert-lora both ways, the renderer."""
    from extensions.flux_kontext.generate import FluxKontextRenderer
    from toolkit.config.schema import ModelConfig

    folder, conventions = trained["folder"], find_conventions("flux_kontext")
    comfy, back = folder / "comfy.safetensors", folder / "back.safetensors"
    assert run.main(["convert-lora", str(trained["final"]), str(comfy), "--to", "comfy"]) == 0
    assert run.main(["convert-lora", str(comfy), str(back), "--to", "diffusers"]) == 0
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir), arch="flux_kontext", max_sequence_length=16)
    for path in (trained["final"], comfy, back):
        for alpha in (ALPHA, 8):
            model = FluxKontext.load(model_cfg, torch.device("cpu"), torch.float32)
            config = make_lora_config(RANK, alpha, FluxKontext.default_lora_targets)
            add_lora(model.transformer, config)
            load_pretrained(model.transformer, str(path), config, conventions)
            assert_same_changes(peft_changes(model.transformer), trained["changes"])
    renderer = FluxKontextRenderer.load(model_cfg, torch.device("cpu"), torch.float32)
    for name, path in (("diffusers_file", trained["final"]), ("comfy_file", comfy)):
        renderer.add_lora(path, name)
        assert_same_changes(peft_changes(renderer.pipe.transformer, name), trained["changes"])

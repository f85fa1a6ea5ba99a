"""model.quantize / quantize_te on Qwen-Image-Edit-Plus: 8-bit linears except the excluded ones, frozen for good."""

from __future__ import annotations

import torch

from extensions.qwen_image_edit.quantize import TRANSFORMER_EXCLUDE
from tests.qwen_helpers import load_qwen


def test_quantized_transformer_and_text_encoder_stay_frozen_and_run(tiny_qwen_dir) -> None:
    from optimum.quanto import QLinear

    qwen = load_qwen(tiny_qwen_dir, quantize=True, quantize_te=True, qtype="qint8", match_target_res=True)
    linears = {name: m for name, m in qwen.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {name for name, m in linears.items() if isinstance(m, QLinear)}
    assert "transformer_blocks.0.attn.to_q" in quantized and "transformer_blocks.1.img_mlp.net.2" in quantized
    assert not quantized & {"img_in", "txt_in", "proj_out", "norm_out.linear"}
    assert not any(name.startswith("time_text_embed") for name in quantized)
    assert set(TRANSFORMER_EXCLUDE) >= {"img_in", "txt_in", "proj_out", "norm_out.linear"}
    assert any(isinstance(m, QLinear) for m in qwen.pipe.text_encoder.modules())
    assert not any(p.requires_grad for p in qwen.transformer.parameters())

    # accelerate's load_state on resume re-enables requires_grad on quanto weights: the hook switches it off again
    qwen.transformer.load_state_dict(qwen.transformer.state_dict())
    assert not any(p.requires_grad for p in qwen.transformer.parameters())


def test_low_vram_gives_the_same_weights_as_the_normal_path(tiny_qwen_dir) -> None:
    """low_vram: block by block, quantized on the CPU; the same quantized (or, without quantize, the same
    full-precision) transformer as loading it whole."""
    for options in ({"quantize": True, "qtype": "qint8"}, {}):
        normal = load_qwen(tiny_qwen_dir, **options).transformer
        low = load_qwen(tiny_qwen_dir, low_vram=True, **options).transformer
        a, b = normal.state_dict(), low.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert type(low.transformer_blocks[0].attn.to_q) is type(normal.transformer_blocks[0].attn.to_q)
        assert not any(p.requires_grad for p in low.parameters())
        low.load_state_dict(low.state_dict())  # a resume's state load keeps the base frozen
        assert not any(p.requires_grad for p in low.parameters())

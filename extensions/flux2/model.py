"""FLUX.2 [klein] 4B / 9B (Flux2KleinPipeline, Qwen3) and FLUX.2 [dev] (Flux2Pipeline, Mistral 3) behind
toolkit.arch.Architecture, with zero, one or several reference (control) images.

The training forward is the pipeline's (conditioning.py): the reference images' tokens follow the noisy target's in
the sequence, each image with its own time offset in the position ids (10, 20, ...), and the prediction is sliced
back to the target tokens. The transformer takes sigma in [0, 1] as its timestep (the pipeline passes scheduler
timesteps / 1000), the t of the trainer's objective: x_t = (1 - t) x0 + t noise, target noise - x0. [dev] is
guidance-distilled: it gets the guidance embedding (train.guidance / the sample's guidance_scale); [klein] base has
none and samples with true CFG against an empty prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from PIL import Image

from extensions.flux2.conditioning import encode_pixels, mask_weights, pack, position_ids, text_ids
from extensions.flux2.text import PromptEncoder
from toolkit import model_folder
from toolkit.arch import Architecture, eval_mode, register_architecture
from toolkit.data.cache import Encoder, make_key, module_fingerprint
from toolkit.data.dataset import control_names
from toolkit.render.sampling import SampleRequest

log = logging.getLogger(__name__)

# Attention and MLP linears of both block kinds; the shared modulation linears, embedders and proj_out stay frozen.
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                r"|to_add_out)|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
                r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")
# Kept in full precision when the base is quantized: the layers touching latents and text directly, and the
# modulations every block reads (small, and errors there reach every token).
QUANTIZE_EXCLUDE = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "time_guidance_embed.*",
                    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                    "single_stream_modulation.linear")
# The pipelines refuse reference images with a side under 64 px; a small sample's control (resized to the sample's
# area, e.g. 74x55 for a 4:3 control at 64x64) is scaled up to it instead of failing the sampling round.
MIN_CONTROL_SIDE = 64


@dataclass
class EncodedBatch:
    x0: torch.Tensor  # (B, N, 128) packed normalised target latents
    references: torch.Tensor  # (B, M, 128) every control image's tokens, in order; M = 0: none
    target_grid: tuple[int, int]  # token (rows, columns) of the target
    reference_grids: tuple[tuple[int, int], ...]  # token grid of each control image
    prompt_embeds: torch.Tensor  # (B, L, D) stacked hidden states of the text encoder


class Flux2Denoiser(torch.nn.Module):
    """transformer([x_t ; references]) sliced back to the target tokens: the module DDP wraps and training calls."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, reference_tokens, encoder_hidden_states, timestep, img_ids, txt_ids,
                guidance=None):
        n_target = hidden_states.shape[1]
        out = self.transformer(hidden_states=torch.cat([hidden_states, reference_tokens], dim=1),
                               encoder_hidden_states=encoder_hidden_states, timestep=timestep, img_ids=img_ids,
                               txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return out[:, :n_target]


@register_architecture
class Flux2Klein(Architecture):
    name = "flux2_klein_4b"
    default_lora_targets = LORA_TARGETS
    pipeline_class: ClassVar[type] = Flux2KleinPipeline

    def __init__(self, pipe: Any, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.device, self.dtype = device, dtype
        self.max_sequence_length = model_cfg.max_sequence_length
        self.prompts = PromptEncoder(pipe, device, model_cfg.max_sequence_length)
        self._denoiser = Flux2Denoiser(self.transformer)
        pipe.set_progress_bar_config(disable=True)

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def check_model_options(cls, model_cfg: Any) -> list[str]:
        """model.match_target_res is accepted and changes nothing: control images always train at the target's size
        here (ai-toolkit's FLUX.2 with match_target_res: true; without it ai-toolkit keeps their own size)."""
        return []

    @classmethod
    def check_source(cls, name_or_path: str) -> list[str]:
        return model_folder.folder_problems(name_or_path, "FLUX.2")

    @classmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "Flux2Klein":
        log.info("loading %s (%s) on %s", model_cfg.name_or_path, dtype, device)
        source = model_folder.source(model_cfg)
        components = model_folder.transformer_override(Flux2Transformer2DModel, model_cfg, source, dtype, device,
                                                       QUANTIZE_EXCLUDE)
        pipe = cls.pipeline_class.from_pretrained(source, dtype=dtype, **components)
        model_folder.freeze_and_quantize(pipe, model_cfg, device, dtype, QUANTIZE_EXCLUDE)
        return cls(pipe, model_cfg, device, dtype)

    # -- training ---------------------------------------------------------------------------------------------
    def denoiser(self) -> torch.nn.Module:
        return self._denoiser

    def encode_batch(self, batch: dict) -> EncodedBatch:
        """Target and control latents (encoded here, or taken from the latent cache) and prompt embeddings. Items
        without control images (a dataset without control_path) get no reference tokens: text-to-image."""
        if "target_latents" in batch:
            target = batch["target_latents"].to(self.device, non_blocking=True)
            controls = [batch[f"{name}_latents"].to(self.device, non_blocking=True)
                        for name in control_names(batch, "_latents")]
        else:
            target = encode_pixels(self.pipe, batch["target"])
            controls = [encode_pixels(self.pipe, batch[name]) for name in control_names(batch)]
        if "prompt_embeds" in batch:
            embeds = batch["prompt_embeds"].to(self.device, non_blocking=True)
        else:
            embeds = self.prompts(batch["caption"])
        x0 = pack(target).to(self.dtype)
        references = torch.cat([x0[:, :0], *(pack(c).to(self.dtype) for c in controls)], dim=1)
        return EncodedBatch(x0=x0, references=references, target_grid=tuple(target.shape[-2:]),
                            reference_grids=tuple(tuple(c.shape[-2:]) for c in controls),
                            prompt_embeds=embeds.to(self.dtype))

    def clean_latents(self, encoded: EncodedBatch) -> torch.Tensor:
        return encoded.x0

    def loss_weights(self, masks: torch.Tensor, encoded: EncodedBatch) -> torch.Tensor:
        return mask_weights(masks.to(self.device), encoded.target_grid, encoded.x0.shape[-1])

    def denoiser_inputs(self, encoded: EncodedBatch, x_t: torch.Tensor, t: torch.Tensor, guidance: float
                        ) -> dict[str, Any]:
        """`guidance` feeds the guidance embedding of a guidance-distilled transformer ([dev]); [klein] has none."""
        guidance_vec = None
        if self.transformer.config.guidance_embeds:
            guidance_vec = torch.full((x_t.shape[0],), float(guidance), device=self.device, dtype=torch.float32)
        return {
            "hidden_states": x_t,
            "reference_tokens": encoded.references,
            "encoder_hidden_states": encoded.prompt_embeds,
            "timestep": t.to(self.device, self.dtype),
            "img_ids": position_ids(encoded.target_grid, encoded.reference_grids, self.device),
            "txt_ids": text_ids(encoded.prompt_embeds.shape[1], self.device),
            "guidance": guidance_vec,
        }

    def with_captions(self, encoded: EncodedBatch, captions: Sequence[str]) -> EncodedBatch:
        return replace(encoded, prompt_embeds=self.prompts(captions).to(self.dtype))

    def stack_inputs(self, inputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        shared = ("img_ids", "txt_ids")  # position ids have no batch dimension
        first = inputs[0]
        return {key: first[key] if key in shared or first[key] is None else torch.cat([i[key] for i in inputs])
                for key in first}

    # -- caching (toolkit.data.cache) --------------------------------------------------------------------------
    def latent_encoder(self) -> Encoder:
        """{"target", "control"[, ...]} pixels -> {"target_latents", ...}: (128, h, w) normalised patchified each."""
        vae = self.vae
        identity = make_key("vae", {"config": dict(vae.config), "weights": module_fingerprint(vae),
                                    "dtype": str(vae.dtype), "latents": "flux2 posterior mode, patchified, bn"})
        return Encoder(identity, self._encode_pixel_items)

    def _encode_pixel_items(self, items: list[dict]) -> list[dict]:
        latents = {f"{name}_latents": encode_pixels(self.pipe, torch.stack([item[name] for item in items]))
                   for name in ("target", *control_names(items[0]))}
        return [{name: value[i] for name, value in latents.items()} for i in range(len(items))]

    def text_encoder(self) -> Encoder:
        return self.prompts.encoder()

    def unload_text_encoders(self, keep: Sequence[str]) -> None:
        """Keep `keep` and the empty prompt (the negative of [klein]'s true CFG in samples) encoded; free Qwen3."""
        self.prompts.unload([*keep, ""])

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, requests: Sequence[SampleRequest],
               controls: Sequence[Union[Image.Image, Sequence[Image.Image]]],
               stop: Optional[Callable[[], bool]] = None) -> list[Image.Image]:
        """One image per request through the diffusers pipeline with our prompt embeddings; a request's control is
        one image or a list of them (an empty list: text-to-image). `stop()` is asked after every denoising step:
        true ends the loop early (the image is then unfinished)."""
        with eval_mode(self.transformer):
            return [self._render(r, c, stop) for r, c in zip(requests, controls)]

    def pipeline_kwargs(self, request: SampleRequest) -> dict[str, Any]:
        """Prompt arguments of the pipeline call: [klein] base samples with true CFG against the empty prompt."""
        kwargs: dict[str, Any] = {"prompt_embeds": self.prompts([request.prompt])}
        if request.guidance_scale > 1 and not self.pipe.config.is_distilled:
            kwargs["negative_prompt_embeds"] = self.prompts([""])
        return kwargs

    def _render(self, request: SampleRequest, control: Union[Image.Image, Sequence[Image.Image]],
                stop: Optional[Callable[[], bool]] = None) -> Image.Image:
        images = [_at_least(image, MIN_CONTROL_SIDE) for image in
                  ([control] if isinstance(control, Image.Image) else control)]
        generator = torch.Generator("cpu").manual_seed(request.seed)  # CPU noise: the same image on any device
        out = self.pipe(image=images or None, height=request.height, width=request.width,
                        num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                        generator=generator, max_sequence_length=self.max_sequence_length, output_type="pil",
                        callback_on_step_end=_interrupt_on(stop), **self.pipeline_kwargs(request))
        return out.images[0]


@register_architecture
class Flux2Klein9B(Flux2Klein):
    """FLUX.2 [klein] 9B: the same pipeline with a larger transformer and Qwen3-8B."""

    name = "flux2_klein_9b"


@register_architecture
class Flux2Dev(Flux2Klein):
    """FLUX.2 [dev]: Mistral 3 text encoder, guidance-distilled transformer (guidance embedding, no true CFG)."""

    name = "flux2"
    pipeline_class = Flux2Pipeline

    def pipeline_kwargs(self, request: SampleRequest) -> dict[str, Any]:
        return {"prompt_embeds": self.prompts([request.prompt])}


def _at_least(image: Image.Image, side: int) -> Image.Image:
    """`image` scaled up (aspect kept) until both sides are at least `side` px; larger images unchanged."""
    if min(image.size) >= side:
        return image
    scale = side / min(image.size)
    return image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))),
                        Image.LANCZOS)


def _interrupt_on(stop: Optional[Callable[[], bool]]):
    """A diffusers step-end callback that ends the denoising loop once `stop()` is true."""
    if stop is None:
        return None

    def callback(pipe, step, timestep, kwargs):
        if stop():
            pipe._interrupt = True
        return {}
    return callback

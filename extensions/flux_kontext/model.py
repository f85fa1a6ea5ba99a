"""FLUX.1 Kontext behind toolkit.arch.Architecture: diffusers components, the Kontext training forward, sampling."""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from extensions.flux_kontext import plan, rope_cache  # sibling modules, not the package API
from extensions.flux_kontext.multi_control import render_multi_control
from extensions.flux_kontext.quantize import (TRANSFORMER_EXCLUDE, keep_base_frozen,
                                              quantize_frozen, safe_exclude)
from extensions.flux_kontext.packing import pack_latents
from extensions.flux_kontext import transformer_source
from extensions.flux_kontext.encoders import LazyEncoders
from toolkit import model_folder
from toolkit.arch import Architecture, eval_mode, register_architecture
from toolkit.data.cache import Encoder, make_key
from toolkit.data.dataset import control_names
from toolkit.render.sampling import SampleRequest

log = logging.getLogger(__name__)

# Attention and MLP linears of both block kinds; not the embedders nor the final projection (top-level proj_out).
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                r"|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")
# Layers kept in full precision when the base is quantized (small, and errors there hurt most): see quantize.py.
QUANTIZE_EXCLUDE = list(TRANSFORMER_EXCLUDE)
TEXT_CACHE_ENTRIES = 128  # in-memory caption embeddings; T5 at 512 tokens x 4096 x bf16 is 4 MiB each
TEXT_ENCODE_BATCH = 16
TEXT_TOKEN_MULTIPLE = 64  # model.trim_text_tokens rounds a batch's text length up to this


@dataclass
class EncodedBatch:
    """Frozen-encoder outputs for one micro-batch: packed latents and text embeddings."""

    x0: torch.Tensor  # (B, N, 64) packed target latents
    control: torch.Tensor  # (B, M1 + M2 + ..., 64) packed latents of every control image, in order; M = 0: none
    target_hw: tuple[int, int]  # latent grid of the target
    control_hws: tuple[tuple[int, int], ...]  # latent grid of each control image (frames 1, 2, ...)
    prompt_embeds: torch.Tensor  # (B, L, D) T5
    pooled: torch.Tensor  # (B, P) CLIP
    text_ids: torch.Tensor  # (L, 3) zeros


class KontextDenoiser(torch.nn.Module):
    """transformer([x_t ; control]) sliced to the target tokens. The module DDP wraps: call it, not the transformer.

    The transformer's RoPE tables are reused for id tensors seen before (rope_cache: pass the cached ids)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        rope_cache.install(transformer)

    def forward(self, hidden_states, control_tokens, encoder_hidden_states, pooled_projections, timestep, guidance,
                img_ids, txt_ids):
        n_target = hidden_states.shape[1]
        with self.transformer.pos_embed.ids(txt_ids, img_ids):
            out = self.transformer(hidden_states=torch.cat([hidden_states, control_tokens], dim=1),
                                   encoder_hidden_states=encoder_hidden_states,
                                   pooled_projections=pooled_projections, timestep=timestep, guidance=guidance,
                                   img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return out[:, :n_target]


@register_architecture
class FluxKontext(Architecture):
    name = "flux_kontext"
    default_lora_targets = LORA_TARGETS
    trains_without_controls = True  # zero control tokens: text-to-image (encode_batch)
    supports_control_resolution = True  # a smaller control gets its own grid of position ids, as in the pipeline
    supports_trim_text_tokens = True

    def __init__(self, pipe: FluxKontextPipeline, model_cfg: Any, device: torch.device, dtype: torch.dtype,
                 source: Optional[str] = None):
        self.pipe = pipe
        self.transformer = pipe.transformer  # None when loaded for caching only (load_encoders)
        self.device, self.dtype = device, dtype
        self.source = model_cfg.name_or_path
        self.max_sequence_length = model_cfg.max_sequence_length
        self.trim_text_tokens = getattr(model_cfg, "trim_text_tokens", False)
        self._token_counts: dict[str, int] = {}  # caption -> T5 tokens (with EOS), for trim_text_tokens
        self.encoders = LazyEncoders(pipe, source or self.source, model_cfg, device, dtype)
        self._denoiser = KontextDenoiser(self.transformer) if self.transformer is not None else None
        self._ids = rope_cache.IdTables()  # position ids per bucket, text ids per length: the same tensors each step
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        # Captions encoded before the text encoders were unloaded (sample prompts, validation captions): never evicted.
        self._pinned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pipe.set_progress_bar_config(disable=True)

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def check_source(cls, name_or_path: str) -> list[str]:
        return model_folder.folder_problems(name_or_path, "FLUX Kontext")

    @classmethod
    def check_model_options(cls, model_cfg: Any) -> list[str]:
        problems = super().check_model_options(model_cfg)
        found = transformer_source.prequantized_files(model_cfg)
        if found is not None and (model_cfg.quantize or model_cfg.low_vram):
            problems.append(f"model.quantize / model.low_vram: the transformer is already quantized ({found[1].detail},"
                            f" {found[0]}) and loads block by block; turn both off")
        return problems

    @property
    def vae(self) -> torch.nn.Module:
        """The VAE, loaded on first use (encoders.py)."""
        return self.encoders.vae()

    def full_pipe(self) -> FluxKontextPipeline:
        """The diffusers pipeline with every encoder loaded (they load lazily otherwise), e.g. to call it directly."""
        self.encoders.text_encoders()
        self.encoders.vae()
        return self.pipe

    @classmethod
    def load_encoders(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "FluxKontext":
        """Tokenizers and scheduler only, the encoders loading when used: for `run.py cache` (no transformer)."""
        source = model_folder.source(model_cfg)
        pipe = FluxKontextPipeline.from_pretrained(source, dtype=dtype, transformer=None, **_LAZY)
        return cls(pipe, model_cfg, device, dtype, source)

    @classmethod
    def plan_model(cls, model_cfg: Any, preset: Optional[str] = None):
        return plan.plan_model(model_cfg, preset, LORA_TARGETS, KontextDenoiser)

    @classmethod
    def plan_presets(cls) -> Sequence[str]:
        return tuple(plan.PRESETS)

    @classmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "FluxKontext":
        log.info("loading %s (%s) on %s", model_cfg.name_or_path, dtype, device)
        # HF_TOKEN is read from the environment by huggingface_hub; it is never passed through our logs or config.
        source = model_folder.source(model_cfg)
        qtype = model_cfg.qtype
        components = {**_LAZY, **cls.transformer_components(model_cfg, source, device, dtype)}  # encoders: lazy
        pipe = FluxKontextPipeline.from_pretrained(source, dtype=dtype, **components)
        pipe.transformer.requires_grad_(False)
        pipe.transformer.eval()
        # Without low_vram, quantize where the weights will live: fast on a GPU (needs the full precision there).
        if model_cfg.quantize and not model_cfg.low_vram:
            transformer = pipe.transformer.to(device)
            quantize_frozen(transformer, qtype, safe_exclude(transformer, qtype, dtype))
        pipe.transformer.to(device)
        keep_base_frozen(pipe.transformer)
        return cls(pipe, model_cfg, device, dtype, source)

    @classmethod
    def transformer_components(cls, model_cfg: Any, source: str, device: torch.device, dtype: torch.dtype
                               ) -> dict[str, torch.nn.Module]:
        """{"transformer": module} when the transformer does not come from the pipeline folder as it is (an FP8 or
        bitsandbytes export, low_vram, model.transformer_path), else {}. tools.gpu_check overrides this to train a
        random-weight transformer of FLUX.1's real size without a 24 GB download."""
        return transformer_source.components(model_cfg, source, device, dtype)

    # -- training ---------------------------------------------------------------------------------------------
    def denoiser(self) -> torch.nn.Module:
        return self._denoiser

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents, using the posterior mean as the Kontext pipeline does."""
        # non_blocking: the loader pins host memory on CUDA, so the copy overlaps instead of syncing the host
        vae = self.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype, non_blocking=True)).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(self.device)

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T5 sequence + CLIP pooled embeddings; each distinct caption is encoded once (bounded LRU cache)."""
        missing = sorted({c for c in captions if c not in self._text_cache and c not in self._pinned})
        if missing:
            if self.encoders.text_unloaded:
                raise RuntimeError(f"the text encoders were unloaded after caching (train.cache_text_embeddings), "
                                   f"but caption {missing[0]!r} was not encoded before")
            embeds, pooled = self._encode_prompts(missing)
            for i, caption in enumerate(missing):
                self._text_cache[caption] = (embeds[i], pooled[i])
        for caption in captions:
            if caption in self._text_cache:
                self._text_cache.move_to_end(caption)
        rows = [self._pinned[c] if c in self._pinned else self._text_cache[c] for c in captions]
        while len(self._text_cache) > TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        embeds = torch.stack([r[0] for r in rows])
        return embeds, torch.stack([r[1] for r in rows]), self._ids.text_ids(embeds.shape[1], self.device,
                                                                              embeds.dtype)

    def _encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoders.text_encoders()
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                                    device=self.encoders.te_device, num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype)  # model.te_* may differ

    def encode_batch(self, batch: dict) -> EncodedBatch:
        """Encoders on a collated batch; latents and embeddings the dataset took from a cache are used as they are.
        Several control images ("control", "control_2", ...) become one token run each, in that order; items without
        control images (a dataset without control_path) get zero control tokens: text-to-image."""
        if "target_latents" in batch:
            target = batch["target_latents"].to(self.device, non_blocking=True)
            controls = [batch[f"{name}_latents"].to(self.device, non_blocking=True)
                        for name in control_names(batch, "_latents")]
        else:
            target = self.encode_images(batch["target"])
            controls = [self.encode_images(batch[name]) for name in control_names(batch)]
        if "prompt_embeds" in batch:
            embeds = batch["prompt_embeds"].to(self.device, non_blocking=True)
            pooled = batch["pooled"].to(self.device, non_blocking=True)
            text_ids = self._ids.text_ids(embeds.shape[1], self.device, self.dtype)
        else:
            embeds, pooled, text_ids = self.encode_captions(batch["caption"])
        if self.trim_text_tokens:
            embeds = embeds[:, :self.text_tokens_needed(batch["caption"])]
            text_ids = self._ids.text_ids(embeds.shape[1], self.device, text_ids.dtype)
        x0 = pack_latents(target).to(self.dtype)
        return EncodedBatch(x0=x0, control=torch.cat([x0[:, :0], *(pack_latents(c).to(self.dtype) for c in controls)],
                                                     dim=1),
                            target_hw=tuple(target.shape[-2:]),
                            control_hws=tuple(tuple(c.shape[-2:]) for c in controls),
                            prompt_embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype), text_ids=text_ids)

    def text_tokens_needed(self, captions: Sequence[str]) -> int:
        """model.trim_text_tokens: T5 positions a batch keeps, its longest caption's token count (with EOS) rounded up
        to TEXT_TOKEN_MULTIPLE, at most max_sequence_length. Tokenizers stay loaded when the encoders are unloaded."""
        for caption in set(captions) - set(self._token_counts):
            self._token_counts[caption] = len(self.pipe.tokenizer_2(caption, truncation=True,
                                                                    max_length=self.max_sequence_length).input_ids)
        longest = max(self._token_counts[c] for c in captions)
        return min(self.max_sequence_length, -(-longest // TEXT_TOKEN_MULTIPLE) * TEXT_TOKEN_MULTIPLE)

    def clean_latents(self, encoded: EncodedBatch) -> torch.Tensor:
        return encoded.x0

    def loss_weights(self, masks: torch.Tensor, encoded: EncodedBatch) -> torch.Tensor:
        """Pixel masks (B, 1, H, W) -> (B, N, 64) weights of the packed target latents: nearest-sampled to the latent
        grid and scaled to mean 1 over the batch (as ai-toolkit), then packed like the latents (feature c*4 + p of a
        token is latent channel c at 2x2 position p, so the 4 packed mask values tile across the channels)."""
        grid = torch.nn.functional.interpolate(masks.to(self.device, torch.float32), size=encoded.target_hw,
                                               mode="nearest")
        grid = grid / grid.mean().clamp_min(1e-6)
        return pack_latents(grid).repeat(1, 1, encoded.x0.shape[-1] // 4)

    def denoiser_inputs(self, encoded: EncodedBatch, x_t: torch.Tensor, t: torch.Tensor, guidance: float
                        ) -> dict[str, torch.Tensor]:
        b = encoded.x0.shape[0]
        return {
            "hidden_states": x_t,
            "control_tokens": encoded.control,
            "encoder_hidden_states": encoded.prompt_embeds,
            "pooled_projections": encoded.pooled,
            "timestep": t.to(self.device, self.dtype),
            "guidance": torch.full((b,), float(guidance), device=self.device, dtype=torch.float32)
            if self.transformer.config.guidance_embeds else None,
            "img_ids": self._ids.image_ids(encoded.target_hw, encoded.control_hws, self.device),
            "txt_ids": encoded.text_ids,
        }

    def with_captions(self, encoded: EncodedBatch, captions: Sequence[str]) -> EncodedBatch:
        embeds, pooled, text_ids = self.encode_captions(captions)
        return replace(encoded, prompt_embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype),
                                   text_ids=text_ids)

    def stack_inputs(self, inputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        shared = ("img_ids", "txt_ids")  # position ids have no batch dimension
        first = inputs[0]
        return {key: first[key] if key in shared or first[key] is None else torch.cat([i[key] for i in inputs])
                for key in first}

    # -- caching (toolkit.data.cache) ------------------------------------------------------------------------------
    def latent_encoder(self) -> Encoder:
        """{"target", "control"[, "control_2", ...]} pixels -> {"target_latents", "control_latents"[, ...]}: (16, h, w)
        each."""
        identity = make_key("vae", {**self.encoders.identity("vae"), "latents": "posterior mode, shifted and scaled"})
        return Encoder(identity, self._encode_pixel_pairs)

    def _encode_pixel_pairs(self, items: list[dict]) -> list[dict]:
        latents = {f"{name}_latents": self.encode_images(torch.stack([item[name] for item in items]))
                   for name in ("target", *control_names(items[0]))}
        return [{name: value[i] for name, value in latents.items()} for i in range(len(items))]

    def text_encoder(self) -> Encoder:
        """caption -> {"prompt_embeds": (L, D) T5, "pooled": (P,) CLIP}."""
        pipe = self.pipe
        if self.encoders.text_unloaded:
            raise RuntimeError("the text encoders are unloaded")
        parts = {"max_sequence_length": self.max_sequence_length}
        for name in ("text_encoder", "text_encoder_2"):  # from the files: the encoders need not be loaded
            parts[name] = self.encoders.identity(name)
        for name in ("tokenizer", "tokenizer_2"):
            parts[name] = make_key("tokenizer", {"json": getattr(pipe, name).backend_tokenizer.to_str()})
        return Encoder(make_key("text", parts), self._encode_caption_list)

    @torch.no_grad()
    def _encode_caption_list(self, captions: list[str]) -> list[dict]:
        embeds, pooled = self._encode_prompts(captions)
        return [{"prompt_embeds": e, "pooled": p} for e, p in zip(embeds, pooled)]

    def pin_text_embeddings(self, embeddings: dict[str, dict[str, torch.Tensor]]) -> None:
        """Caption embeddings taken from the cache (text_encoder's outputs), kept for good: sample prompts and
        validation captions then need no text encoder."""
        self._pinned.update({c: (t["prompt_embeds"].to(self.device), t["pooled"].to(self.device))
                             for c, t in embeddings.items()})

    def unload_text_encoders(self, keep: Sequence[str]) -> None:
        """Encode `keep` (sample prompts, validation captions) for good, unless pinned already, then free both text
        encoders (or make sure they never load)."""
        if self.encoders.text_unloaded:
            return
        keep = sorted(set(keep) - set(self._pinned))
        for start in range(0, len(keep), TEXT_ENCODE_BATCH):
            chunk = keep[start:start + TEXT_ENCODE_BATCH]
            with torch.no_grad():
                embeds, pooled = self._encode_prompts(chunk)
            self._pinned.update({c: (embeds[i], pooled[i]) for i, c in enumerate(chunk)})
        self._text_cache.clear()
        self.encoders.unload_text()
        log.info("text encoders unloaded; %d prompts kept encoded", len(self._pinned))

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, requests: Sequence[SampleRequest],
               controls: Sequence[Union[Image.Image, Sequence[Image.Image]]],
               stop: Optional[Callable[[], bool]] = None) -> list[Image.Image]:
        """One image per request; a request's control is one image or a list of them (several --ctrl_img; an empty
        list: text-to-image, FluxKontextPipeline with image=None). `stop()` is asked after every denoising step: true
        ends the loop early (the image is then unfinished)."""
        with self.vae_on_device(), eval_mode(self.transformer):
            return [self._render(r, c, stop) for r, c in zip(requests, controls)]

    @contextlib.contextmanager
    def vae_on_device(self) -> Iterator[None]:
        """The VAE (loaded now if training never needed it) on the training device for a pipeline call: the pipeline
        runs on its first module's device, the VAE's; back on model.vae_device afterwards."""
        vae = self.vae
        home = vae.device
        vae.to(self.device)
        try:
            yield
        finally:
            vae.to(home)

    def _render(self, request: SampleRequest, control: Union[Image.Image, Sequence[Image.Image]],
                stop: Optional[Callable[[], bool]] = None) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(request.seed)  # CPU noise: same image on any device
        # Through our caption cache: works after the text encoders were unloaded (cache_text_embeddings).
        embeds, pooled, _ = self.encode_captions([request.prompt])
        controls = [control] if isinstance(control, Image.Image) else list(control)
        if len(controls) > 1:  # FluxKontextPipeline takes one control image: our loop (multi_control.py)
            return render_multi_control(self.pipe, controls, embeds, pooled, request.width, request.height,
                                        request.steps, request.guidance_scale, generator)
        control = controls[0] if controls else None
        out = self.pipe(image=control, prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=request.height,
                        width=request.width,
                        num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                        # without max_area the pipeline rescales every request to 1024x1024 pixels
                        max_area=request.width * request.height, generator=generator,
                        max_sequence_length=self.max_sequence_length,
                        _auto_resize=False, output_type="pil", callback_on_step_end=_interrupt_on(stop))
        return out.images[0]


_LAZY = {"vae": None, "text_encoder": None, "text_encoder_2": None}  # loaded on first use (encoders.py)


def _interrupt_on(stop: Optional[Callable[[], bool]]):
    """A diffusers step-end callback that ends the denoising loop once `stop()` is true (the pipeline then skips the
    remaining steps)."""
    if stop is None:
        return None

    def callback(pipe, step, timestep, kwargs):
        if stop():
            pipe._interrupt = True
        return {}
    return callback

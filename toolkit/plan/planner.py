"""The memory plan of a training config: device bytes per part, the peak, and whether it fits.

Weights, adapter, gradients, optimizer states and EMA follow from parameter shapes (toolkit.plan.parts) of the
architecture's meta-device skeleton with the trainer's own adapter code applied (toolkit.adapters.full_finetune).
Activations come from traced steps (toolkit.plan.trace): the denoiser is rebuilt with one block of each repeated
kind, then with one more block of each kind in turn, each traced once on fake tensors at the largest bucket's shape;
the full model's peak is the one-block peak plus, per kind, (blocks - 1) times that kind's increment (a step's peak
grows linearly in the block count: every block keeps the same saved tensors).

Two peaks are planned: loading (every component on the device before the text encoders are unloaded; with
model.quantize and not low_vram the full-precision transformer is first moved to the device and quantized there)
and training (what stays resident plus one step). A quantized base also holds one dequantized weight of its largest
layer during a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from toolkit.adapters.full_finetune import add_trainable
from toolkit.dtypes import compute_dtype
from toolkit.plan.model import PlanModel, TraceShape
from toolkit.plan.parts import (dtype_bytes, module_bytes, optimizer_state_bytes, quantized_bytes, quantized_layers,
                                tensor_bytes)
from toolkit.plan.trace import trace_no_grad, trace_step

GiB = 1024 ** 3
REAL_TRACE_MAX_BYTES = 64 * 2 ** 20  # traced models and inputs up to this size run on real CPU tensors (faster)


@dataclass(frozen=True)
class Options:
    """The choices of a config the plan depends on; the advice varies them one at a time."""

    dtype: torch.dtype
    quantize: bool
    qtype: str
    quantize_te: bool
    low_vram: bool
    text_cached: bool  # train.cache_text_embeddings or unload_text_encoder: text encoders unloaded before training
    checkpointing: bool
    optimizer: str
    optimizer_params: tuple = ()
    network: Any = None  # NetworkConfig; None: full fine-tune
    ema: bool = False  # an EMA copy on the device
    batch: int = 1
    resolution: int = 1024
    controls: int = 1
    control_side: float = 1.0  # control image side relative to the target's
    text_tokens: int = 512
    size: Optional[tuple[int, int]] = None  # exact target (height, width) in pixels instead of resolution x resolution
    latents_cached: bool = False  # every dataset caches its latents: no VAE encoding in the step

    @classmethod
    def from_config(cls, cfg: Any) -> "Options":
        """From a TrainProcessConfig: the largest dataset resolution and the most control images of any dataset."""
        train, model = cfg.train, cfg.model
        device = torch.device("cpu" if cfg.device == "cpu" else "cuda")
        controls = max((len(d.control_path) if isinstance(d.control_path, list) else int(d.control_path is not None)
                        for d in cfg.datasets), default=0)
        return cls(dtype=compute_dtype(train.dtype, device), quantize=model.quantize, qtype=model.qtype,
                   quantize_te=model.quantize_te, low_vram=model.low_vram,
                   text_cached=train.cache_text_embeddings or train.unload_text_encoder,
                   checkpointing=train.gradient_checkpointing, optimizer=train.optimizer,
                   optimizer_params=tuple(sorted(train.optimizer_params.items())),
                   network=None if train.full_finetune else cfg.network,
                   ema=train.ema_config.use_ema and not train.ema_config.ema_on_cpu,
                   batch=train.batch_size * (2 if train.diff_output_preservation else 1),
                   resolution=max(r for d in cfg.datasets for r in d.resolution), controls=controls,
                   text_tokens=model.max_sequence_length,
                   latents_cached=all(d.cache_latents or d.cache_latents_to_disk for d in cfg.datasets))

    def shape(self) -> TraceShape:
        target = self.size or (self.resolution, self.resolution)
        control = tuple(max(16, int(round(side * self.control_side / 16)) * 16) for side in target)
        return TraceShape(batch=self.batch, target_hw=target, control_hws=(control,) * self.controls,
                          text_tokens=self.text_tokens, dtype=self.dtype)


@dataclass(frozen=True)
class Part:
    name: str
    nbytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    options: Options
    parts: list[Part]  # resident during training, plus one step
    load_peak: int
    load_note: str
    activations_other: int  # the step's activations with the other gradient checkpointing setting
    tokens: tuple[int, int, int]  # target, control, text tokens of one item
    gpu_bytes: Optional[int] = None
    variants: list[tuple[str, "MemoryPlan"]] = field(default_factory=list)  # advice: (change, its plan)

    @property
    def train_peak(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.load_peak)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_bytes is None else self.peak <= self.gpu_bytes


class Planner:
    """Plans for one architecture skeleton; traces are cached, so variants of the same shape cost nothing."""

    def __init__(self, model: PlanModel) -> None:
        self.model = model
        self._traces: dict[tuple, int] = {}

    def _trace(self, counts: dict[str, int], opts: Options) -> int:
        key = (tuple(sorted(counts.items())), opts.shape(), opts.checkpointing, repr(opts.network))
        if key not in self._traces:
            pm = self.model
            transformer = pm.build_transformer(counts, opts.dtype)
            add_trainable(transformer, opts.network, pm.lora_targets)
            if opts.checkpointing:
                transformer.enable_gradient_checkpointing()
            transformer.train()
            step = trace_step(pm.denoiser(transformer), lambda: pm.trace_inputs(opts.shape()),
                              lambda out: out.float().pow(2).mean(), fake=not self._small(transformer, opts=opts))
            self._traces[key] = step.peak_bytes
        return self._traces[key]

    def encode_bytes(self, opts: Options) -> int:
        """Peak bytes of encoding one batch (VAE and/or text encoders) in the step, 0 when both are cached."""
        images, text = not opts.latents_cached, not opts.text_cached
        if self.model.encode is None or not (images or text):
            return 0
        key = ("encode", opts.shape(), images, text)
        if key not in self._traces:
            modules, run = self.model.encode(opts.shape(), images, text)
            self._traces[key] = trace_no_grad(modules, run, fake=not self._small(*modules, opts=opts))
        return self._traces[key]

    @staticmethod
    def _small(*modules: torch.nn.Module, opts: Options) -> bool:
        """Whether the traced modules and a generous bound of the batch's activations fit REAL_TRACE_MAX_BYTES."""
        shape = opts.shape()
        pixels = sum(h * w for h, w in (shape.target_hw, *shape.control_hws))
        rough = shape.batch * (pixels + shape.text_tokens * 256) * 4 * 64  # 64 fp32 values per pixel or text token
        return sum(tensor_bytes(t) for m in modules for t in (*m.parameters(), *m.buffers())) + rough \
            < REAL_TRACE_MAX_BYTES

    def step_bytes(self, opts: Options) -> int:
        """Peak bytes one forward + backward allocates at the full block counts (activations and gradients)."""
        base = {k: min(1, n) for k, n in self.model.block_counts.items()}
        first = self._trace(base, opts)
        total = first
        for kind, count in self.model.block_counts.items():
            if count > 1:
                total += (count - 1) * (self._trace({**base, kind: 2}, opts) - first)
        return total

    def plan(self, opts: Options, gpu_bytes: Optional[int] = None, other: bool = True) -> MemoryPlan:
        """The plan of `opts`; `other`: also trace the other gradient checkpointing setting (informational)."""
        pm = self.model
        transformer = pm.build_transformer(dict(pm.block_counts), opts.dtype)
        full_bytes = module_bytes(transformer)
        exclude = pm.quantize_exclude(transformer, opts.qtype, opts.dtype, te=False)  # names before the adapter wraps layers
        frozen = quantized_bytes(transformer, exclude, opts.dtype) if opts.quantize else full_bytes
        largest = max((m.weight.numel() for m in quantized_layers(transformer, exclude)), default=0)
        trainable = add_trainable(transformer, opts.network, pm.lora_targets)[0]
        if opts.network is None:  # a full fine-tune: the weights are the trained parameters, counted once
            frozen = 0
        encoders = sum(self._encoder_bytes(name, module, opts) for name, module in pm.text_encoders.items())
        vae = module_bytes(pm.vae, opts.dtype)
        weights = sum(tensor_bytes(p) for p in trainable)
        grads = sum(tensor_bytes(p) for p in trainable)
        denoise, encode = self.step_bytes(opts), self.encode_bytes(opts)
        step = max(denoise, encode)  # the encoders run and free their memory before the denoiser's forward
        other_step = max(self.step_bytes(replace(opts, checkpointing=not opts.checkpointing)), encode) \
            if other else grads
        kind = f"{opts.qtype}" if opts.quantize else str(opts.dtype).replace("torch.", "")
        adapter = "full fine-tune" if opts.network is None else f"{opts.network.type} rank {opts.network.linear}"
        parts = [Part(f"transformer weights ({kind})", frozen),
                 Part("text encoders", 0 if opts.text_cached else encoders,
                      "unloaded after caching" if opts.text_cached else "resident"),
                 Part("VAE", vae),
                 Part(f"trained weights ({adapter})", weights, f"{len(trainable)} tensors"),
                 Part("gradients", grads),
                 Part(f"optimizer states ({opts.optimizer})",
                      optimizer_state_bytes(opts.optimizer, trainable, dict(opts.optimizer_params))),
                 Part("EMA copy", sum(4 * p.numel() for p in trainable) if opts.ema else 0),
                 Part("activations", max(0, step - grads),
                      f"gradient checkpointing {'on' if opts.checkpointing else 'off'}"
                      + ("; the VAE/text encoding of the batch peaks higher than the denoiser's step"
                         if encode > denoise else ""))]
        if opts.quantize:
            parts.append(Part("dequantized weight (largest layer)", largest * dtype_bytes(opts.dtype)))
        load = (frozen if opts.network is not None else weights) + encoders + vae
        load_note = "all components before the text encoders unload"
        if opts.quantize and not opts.low_vram:
            load = max(load, full_bytes)
            load_note = "the full-precision transformer, quantized on the device (model.low_vram avoids it)"
        shape = opts.shape()
        tokens = (pm.image_tokens(*shape.target_hw), sum(pm.image_tokens(*hw) for hw in shape.control_hws),
                  shape.text_tokens)
        return MemoryPlan(opts, parts, load, load_note, max(0, other_step - grads), tokens, gpu_bytes)

    def _encoder_bytes(self, name: str, module: torch.nn.Module, opts: Options) -> int:
        if opts.quantize_te and name == self.model.quantize_te:
            return quantized_bytes(module, self.model.quantize_exclude(module, opts.qtype, opts.dtype, te=True),
                                   opts.dtype)
        return module_bytes(module, opts.dtype)

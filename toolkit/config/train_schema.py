"""The `train` section of a training process (optimisation, objective, sampling schedule) and its EMA sub-section;
re-exported by ``schema.py``, whose docstring describes the field metadata."""

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from toolkit.config.fields import _meta, _expand_home, GT0, GE0, GE1, NON_EMPTY, OPEN_UNIT

__all__ = ["EMAConfig", "TrainConfig", "TrainDType"]

TrainDType = Literal["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"]


@dataclass(kw_only=True)
class EMAConfig:
    """Exponential moving average of the trained weights."""

    use_ema: bool = field(default=False, metadata=_meta(
        "Keep an exponential moving average of the LoRA weights, updated after optimizer steps; samples, "
        "validation and every saved LoRA use the average, the training state keeps both.", aliases=("ema",)))
    ema_decay: float = field(default=0.99, metadata=_meta(
        "Weight of the old average at each update: ema = decay * ema + (1 - decay) * weights.", OPEN_UNIT,
        aliases=("decay",)))
    ema_warmup: bool = field(default=False, metadata=_meta(
        "Use min(ema_decay, (1 + n) / (10 + n)) at update n, so the untrained start is forgotten quickly "
        "(torch_ema's use_num_updates); false: ema_decay from the first update, as ai-toolkit.",
        aliases=("use_num_updates", "use_ema_warmup")))
    ema_update_every: int = field(default=1, metadata=_meta(
        "Update the average every this many optimizer steps (ema_decay applies per update).", GE1,
        aliases=("update_every", "ema_every")))
    ema_on_cpu: bool = field(default=False, metadata=_meta(
        "Hold the average on the CPU instead of the training device (saves device memory; each update copies the "
        "LoRA weights to the CPU).", aliases=("offload_ema", "ema_offload", "ema_device")))


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings."""

    batch_size: int = field(default=1, metadata=_meta(
        "Images per step on each process.", GT0, aliases=("train_batch_size",)))
    steps: int = field(default=1000, metadata=_meta(
        "Total optimizer steps.", GT0, aliases=("max_train_steps", "max_steps", "num_steps", "train_steps")))
    gradient_accumulation_steps: int = field(default=1, metadata=_meta(
        "Micro-batches accumulated per optimizer step.", GT0, aliases=("gradient_accumulation",)))
    train_unet: bool = field(default=True, metadata=_meta(
        "Train the transformer, which holds the LoRA; must be true.", aliases=("train_transformer",)))
    train_text_encoder: bool = field(default=False, metadata=_meta(
        "Train the text encoders; not supported, must be false."))
    gradient_checkpointing: bool = field(default=True, metadata=_meta(
        "Recompute activations during backward to save memory."))
    num_workers: Optional[int] = field(default=None, metadata=_meta(
        "DataLoader worker processes per training process (never persistent: see toolkit/data/dataset.py). null: "
        "0 on CPU, where workers take cores from the step (measured slower), else min(4, half this process's "
        "cores). Batches are the same for any value; CUDA runs pin host memory.", GE0,
        aliases=("dataloader_num_workers", "workers")))
    compile: bool = field(default=False, metadata=_meta(
        "torch.compile each repeated transformer block in place (regional compilation; LoRA keys unchanged). "
        "Costs compile time per new bucket shape (bounded recompiles, then eager); needs a C++ compiler on CPU.",
        aliases=("torch_compile", "compile_transformer")))
    noise_scheduler: Literal["flowmatch"] = field(default="flowmatch", metadata=_meta(
        "Training noise schedule; FLUX uses flow matching."))
    optimizer: Literal["adamw", "adamw8bit", "adam", "adafactor", "prodigy", "sgd"] = field(
        default="adamw8bit", metadata=_meta(
            "Optimizer: adamw, adamw8bit (bitsandbytes), adam (torch Adam, eps 1e-6 as ai-toolkit), adafactor "
            "(transformers' Adafactor with relative_step, scale_parameter and warmup_init off, so train.lr and the "
            "schedule apply, as ai-toolkit), prodigy (prodigyopt), sgd.", aliases=("optim", "optimizer_type")))
    optimizer_params: dict[str, Any] = field(default_factory=dict, metadata=_meta(
        "Extra keyword arguments for the optimizer, e.g. weight_decay.", aliases=("optimizer_args",)))
    lr: float = field(default=1e-4, metadata=_meta(
        "Peak learning rate.", GT0, aliases=("learning_rate", "unet_lr")))
    lr_scheduler: Literal["constant", "cosine", "linear", "cosine_with_restarts", "constant_with_warmup", "step"] = \
        field(default="constant", metadata=_meta(
            "Learning-rate schedule after the warm-up (diffusers' get_scheduler); constant_with_warmup: linear "
            "warm-up over lr_scheduler_params.num_warmup_steps, then lr; step: lr * gamma^(steps // step_size); the "
            "planned curve is written to TensorBoard as train/lr_schedule at the start of a run."))
    lr_scheduler_params: dict[str, Any] = field(default_factory=dict, metadata=_meta(
        "Options of the schedule: cosine_with_restarts takes num_cycles (integer >= 1, default 1); "
        "constant_with_warmup num_warmup_steps (integer >= 0, default 1000 as ai-toolkit); step step_size "
        "(integer >= 1, required) and gamma (number > 0, default 0.1); the others take none.",
        aliases=("lr_scheduler_args", "scheduler_params")))
    lr_warmup_steps: int = field(default=0, metadata=_meta(
        "Steps of linear warm-up from 0 to lr.", GE0, aliases=("warmup_steps",)))
    max_grad_norm: float = field(default=1.0, metadata=_meta(
        "Clip the gradient norm to this value; 0 disables clipping.", GE0, aliases=("clip_grad_norm",)))
    max_nonfinite_steps: int = field(default=3, metadata=_meta(
        "A step whose loss or gradient norm is NaN/Inf is skipped (no optimizer or EMA update, nothing saved) and "
        "logged with its batch's files; after this many in a row the run stops with exit status 1, the last good "
        "checkpoint intact.", GE1))
    ddp_timeout_seconds: int = field(default=1800, metadata=_meta(
        "Multi-process runs: a collective (gradient all-reduce, barrier) that waits longer than this for a stalled "
        "or dead rank fails and ends every rank instead of hanging.", GE1))
    timestep_type: Literal["sigmoid", "linear", "weighted", "shift", "flux_shift", "lognorm_blend"] = field(
        default="sigmoid", metadata=_meta(
            "How training timesteps are sampled (toolkit/train/timesteps.py): flux_shift draws from 1000 times "
            "shifted by FLUX's resolution-dependent mu, lognorm_blend from 750 log-normal times near the noisy end "
            "plus 250 evenly spaced ones, both as ai-toolkit's flow-matching scheduler."))
    content_or_style: Literal["balanced", "content", "style"] = field(default="balanced", metadata=_meta(
        "Which noise levels to favour (ai-toolkit's cubic index sampling): content favours high noise (layout, "
        "structure), style low noise (texture, detail), balanced none."))
    loss_type: Literal["mse", "mae", "pseudo_huber"] = field(default="mse", metadata=_meta(
        "Per-element loss of prediction vs target: mse (squared error), mae (absolute error), pseudo_huber "
        "(sqrt(e^2 + 0.01^2) - 0.01), as ai-toolkit."))
    dtype: TrainDType = field(default="bf16", metadata=_meta(
        "Compute dtype of the frozen model weights.", aliases=("mixed_precision",)))
    seed: int = field(default=42, metadata=_meta("Random seed for noise, timesteps and data order."))
    guidance: float = field(default=1.0, metadata=_meta(
        "Guidance embedding value fed to the transformer during training.", GE0))
    distributed_training: bool = field(default=False, metadata=_meta(
        "Train data-parallel across the processes started by accelerate launch."))
    full_finetune: bool = field(default=False, metadata=_meta(
        "Train the transformer's own weights instead of a LoRA (same as network: null); saves a diffusers "
        "transformer folder <run folder>/transformer. Not with model.quantize.",
        aliases=("full_fine_tune", "finetune", "full_ft")))
    disable_sampling: bool = field(default=False, metadata=_meta("Never generate sample images."))
    skip_first_sample: bool = field(default=False, metadata=_meta(
        "Skip the sample images made before the first step."))
    force_first_sample: bool = field(default=False, metadata=_meta(
        "Also make the before-training samples when resuming (at the resumed step); skip_first_sample wins."))
    diff_output_preservation: bool = field(default=False, metadata=_meta(
        "Differential output preservation (ai-toolkit's): each step also predicts, on the caption with trigger_word "
        "replaced by diff_output_preservation_class, once without the LoRA (no gradient) and once with it, and adds "
        "multiplier * MSE(with, without), so the LoRA leaves the class itself unchanged. Needs trigger_word and a "
        "network; two extra transformer forwards per step."))
    diff_output_preservation_multiplier: float = field(default=1.0, metadata=_meta(
        "Weight of the preservation loss.", GE0))
    diff_output_preservation_class: str = field(default="", metadata=_meta(
        "Class word that replaces trigger_word in the preservation captions, e.g. 'woman' for a person LoRA."))
    reg_weight: float = field(default=1.0, metadata=_meta(
        "Loss weight of regularisation items (datasets with is_reg), times their dataset's loss_multiplier.", GE0))
    ema_config: EMAConfig = field(default_factory=EMAConfig, metadata=_meta(
        "Exponential moving average of the trained LoRA weights (use_ema, ema_decay, ...)."))
    cache_text_embeddings: bool = field(default=False, metadata=_meta(
        "Encode every caption (and the empty caption used by caption dropout) once before training, then unload "
        "the text encoders; embeddings are stored where each dataset caches its latents, else in memory. Not "
        "with shuffle_tokens.", aliases=("cache_text_encoder_outputs", "cache_te_outputs")))
    unload_text_encoder: bool = field(default=False, metadata=_meta(
        "ai-toolkit's unload_text_encoder: encode only the trigger word (the empty caption without one), the empty "
        "caption and the sample prompts, then unload the text encoders; every training image then trains on the "
        "trigger word alone and regularisation images on the empty caption: caption files are ignored. With "
        "cache_text_embeddings the cached captions are used instead (the same as cache_text_embeddings alone)."))
    resume_from: Optional[str] = field(default=None, metadata=_meta(
        "Training state to resume from: a state folder (<run folder>/state/<step>) or 'latest' (the newest in the "
        "run folder, even if the config changed). null: resume automatically from the newest state when the config "
        "is unchanged (run.py --fresh starts over in a new folder).", NON_EMPTY, normalize=_expand_home,
        aliases=("resume", "resume_from_checkpoint", "resume_path")))

"""ai-toolkit's config keys and what each one means here, applied to a raw training process before type conversion.

ai-toolkit reads its YAML with ``kwargs.get``, so its configs carry many keys this trainer does not have. Strict
loading must still reject typos, so every key ai-toolkit defines that is not one of our own gets one disposition in
``TABLE`` (our own keys are the fields of ``schema.py`` and need no entry):

- ``Mapped``: written as one of our keys (``target``), its value converted when the spelling differs;
- ``NoEffect``: cannot change a FLUX Kontext LoRA here, whatever its value; dropped and named in one log line;
- ``Unsupported``: at its "off" value (ai-toolkit's default) it changes nothing and is dropped like ``NoEffect``;
  any other value would change training in a way not implemented here, so loading fails, naming key and value.

``aitoolkit_values.VALUES`` covers ai-toolkit's spellings of values of our own keys (``type: diffusion_trainer``, ``optimizer:
prodigyopt``) and the values we refuse by name. ``aitoolkit_translate.translate_process`` applies both tables to
one process; the loader calls ``translate_job`` before type conversion.

Implementing an ``Unsupported`` key: add the field to ``schema.py`` and delete its line here (a test checks that the
table and the schema never share a key, and that every key of ai-toolkit's config classes is covered:
tests/data/aitoolkit/keys.txt, written by tools/extract_aitoolkit_keys.py).
"""

from __future__ import annotations

from typing import Any

from toolkit.config.aitoolkit_rules import EMPTY, Mapped, NoEffect, Rule, Unsupported, is_empty, same_value
from toolkit.config.schema import (DatasetConfig, EMAConfig, JobConfig, ModelConfig, NetworkConfig, RootConfig,
                                   SampleConfig, SaveConfig, TrainConfig, TrainProcessConfig)

__all__ = ["SECTIONS", "TABLE"]


_VIDEO = "video only; images train with num_frames 1"
_AUDIO = "audio models only"
_SPEED = "changes speed or memory, not the trained weights"
_NO_CONV = "the FLUX transformer has no convolution layers"
_UI = "bookkeeping of ai-toolkit's web UI"
_ONLY_WITH = "only used together with {}, which is refused unless off"
_FLOW = "FLUX Kontext trains with flow matching; a different target or weighting is not implemented here"
_NOISE = "noise tricks are not implemented here"
_ADAPTERS = "only for adapters, embeddings, refiners or text encoders, none of which are trained here"
_OTHER_ARCH = "for other architectures; model.arch selects the architecture here"


def _same_te_qtype(value: Any, model: dict) -> bool:
    """qtype_te changes nothing when the text encoder is not quantized or gets the same type as the transformer."""
    quantized = model.get("quantize_te", model.get("quantize")) is True  # ai-toolkit: quantize_te defaults to quantize
    return not quantized or same_value(value, model.get("qtype", "qfloat8"))


def _base_model(value: Any, model: dict) -> bool:
    """extras_name_or_path defaults to name_or_path in ai-toolkit."""
    return is_empty(value) or same_value(value, model.get("name_or_path"))


def _with(key: str) -> NoEffect:
    return NoEffect(_ONLY_WITH.format(key))


def _samples_rule(why: str) -> Mapped:
    return Mapped("sample.prompts", why)


# Keys by section; sections are key paths inside a training process ("process" is the process itself).
TABLE: dict[str, dict[str, Rule]] = {
    "config": {
        "device": NoEffect("each process has its own device"),
    },
    "process": {
        "sqlite_db_path": NoEffect(_UI),
        "training_seed": Mapped("train.seed", "seeds noise, timesteps and data order"),
        "log_dir": NoEffect("TensorBoard logs are written inside the run folder here"),
        "torch_profiler": NoEffect("profiling does not change training"),
        "first_sample": Unsupported(EMPTY, "a separate sample section for the first samples is not implemented"),
        "guidance": Unsupported(EMPTY, "guidance (slider) training is not implemented"),
        "embedding": Unsupported(EMPTY, "textual-inversion embeddings are not implemented"),
        "decorator": Unsupported(EMPTY, "decorator training is not implemented"),
        "adapter": Unsupported(EMPTY, "adapter training is not implemented; this trainer trains a LoRA or LoKr"),
        "do_lorm": Unsupported((False,), "LoRM is not implemented"),
        "lorm_extract_mode": _with("do_lorm"),
        "lorm_extract_mode_param": _with("do_lorm"),
    },
    "logging": {
        "log_every": Mapped("log_every", "steps between logged scalars"),
        "use_ui_logger": NoEffect(_UI),
        "verbose": NoEffect("console verbosity"),
        "use_wandb": Mapped("trackers.use_wandb", "Weights & Biases logging, besides TensorBoard"),
        "project_name": Mapped("trackers.project_name", "W&B project (MLflow experiment)"),
        "run_name": Mapped("trackers.run_name", "name of the tracked run"),
    },
    "save": {
        "save_format": Mapped("save.format", "ai-toolkit always saves FLUX LoRAs with diffusers keys",
                              convert=lambda value: "diffusers" if value in ("safetensors", "diffusers") else value),
    },
    "network": {
        "rank": Mapped("network.linear", "older spelling of linear"),
        "alpha": Mapped("network.linear_alpha", "linear_alpha's default", unless_set=True),
        "pretrained_lora_path": Mapped("network.pretrained_lora", "start from this adapter file"),
        "conv": NoEffect(_NO_CONV),
        "conv_alpha": NoEffect(_NO_CONV),
        "split_multistage_loras": NoEffect("two-stage video models only"),
        "network_kwargs": Unsupported(EMPTY, "module filters are not implemented; use network.target_modules"),
        "lorm": Unsupported(EMPTY, "LoRM is not implemented"),
        "transformer_only": Unsupported((True,), "adapters on the text encoders are not implemented"),
        "old_lokr_format": Unsupported((False,), "LoKr files are saved with ComfyUI's lokr keys only"),
        "layer_offloading": Unsupported((False,), "layer offloading is not implemented"),
        "all_layers": Unsupported((False,), "adapters on layers other than linear ones are not implemented"),
    },
    "model": {
        "compile": Mapped("train.compile", "torch.compile of the transformer, here block by block"),
        "dtype": NoEffect("ai-toolkit replaces model.dtype by train.dtype"),
        "block_compile": NoEffect(_SPEED),
        "compile_mode": NoEffect(_SPEED),
        "compile_fullgraph": NoEffect(_SPEED),
        "compile_dynamic": NoEffect(_SPEED),
        "cache_size_limit": NoEffect(_SPEED),
        "layer_offloading_transformer_percent": _with("layer_offloading"),
        "layer_offloading_text_encoder_percent": _with("layer_offloading"),
        "split_model_other_module_param_count_scale": _with("split_model_over_gpus"),
        "refiner_start_at": _with("refiner_name_or_path"),
        "experimental_xl": NoEffect(_OTHER_ARCH),
        "use_text_encoder_1": NoEffect(_OTHER_ARCH),
        "use_text_encoder_2": NoEffect(_OTHER_ARCH),
        "text_encoder_bits": NoEffect(_OTHER_ARCH),
        "unet_sample_size": NoEffect(_OTHER_ARCH),
        "is_v2": Unsupported((False,), _OTHER_ARCH),
        "is_v3": Unsupported((False,), _OTHER_ARCH),
        "is_xl": Unsupported((False,), _OTHER_ARCH),
        "is_ssd": Unsupported((False,), _OTHER_ARCH),
        "is_vega": Unsupported((False,), _OTHER_ARCH),
        "is_pixart": Unsupported((False,), _OTHER_ARCH),
        "is_pixart_sigma": Unsupported((False,), _OTHER_ARCH),
        "is_auraflow": Unsupported((False,), _OTHER_ARCH),
        "is_lumina2": Unsupported((False,), _OTHER_ARCH),
        "is_flux": Unsupported((False,), _OTHER_ARCH),
        "is_v_pred": Unsupported((False,), "v-prediction is not implemented; FLUX predicts flow"),
        "use_flux_cfg": Unsupported((False,), "training without the guidance embedding is not implemented"),
        "qtype_te": Unsupported(_same_te_qtype, "a text-encoder quantization type other than qtype is not "
                                               "implemented; quantize_te uses qtype"),
        "quantize_kwargs": Unsupported(EMPTY, "extra quantization options are not implemented"),
        "accuracy_recovery_adapter": Unsupported(EMPTY, "accuracy recovery adapters are not implemented"),
        "layer_offloading": Unsupported((False,), "layer offloading is not implemented"),
        "auto_memory": Unsupported((False,), "layer offloading is not implemented"),
        "split_model_over_gpus": Unsupported((False,), "splitting the model over GPUs is not implemented"),
        "attn_masking": Unsupported((False,), "attention masking of padded prompt tokens is not implemented"),
        "model_kwargs": Unsupported(EMPTY, "extra model options other than match_target_res (model.match_target_res) "
                                           "are not implemented"),
        "model_paths": Unsupported(EMPTY, "per-component model paths are not implemented"),
        "in_context": Unsupported((False,), "in-context training is not implemented"),
        "vae_path": Unsupported(EMPTY, "a separate VAE is not implemented"),
        "te_name_or_path": Unsupported(EMPTY, "separate text encoders are not implemented"),
        "extras_name_or_path": Unsupported(_base_model, "a separate model for the VAE and text encoders is not "
                                                  "implemented"),
        "unet_path": Unsupported(EMPTY, "use model.transformer_path for another transformer"),
        "refiner_name_or_path": Unsupported(EMPTY, "refiner models are not implemented"),
        "lora_path": Unsupported(EMPTY, "loading a LoRA into the base model is not implemented"),
        "assistant_lora_path": Unsupported(EMPTY, "assistant LoRAs are not implemented"),
        "inference_lora_path": Unsupported(EMPTY, "inference LoRAs are not implemented"),
        "unconditional_lora_path": Unsupported(EMPTY, "unconditional LoRAs are not implemented"),
        "latent_space_version": Unsupported(EMPTY, _OTHER_ARCH),
        "ignore_if_contains": Unsupported(EMPTY, "module filters are not implemented; use network.target_modules"),
        "only_if_contains": Unsupported(EMPTY, "module filters are not implemented; use network.target_modules"),
    },
    "train": {
        "gradient_accumulation": Mapped("train.gradient_accumulation_steps", "micro-batches per optimizer step"),
        "unet_lr": NoEffect("ai-toolkit trains a LoRA with train.lr"),
        "text_encoder_lr": NoEffect(_ADAPTERS),
        "refiner_lr": NoEffect(_ADAPTERS),
        "embedding_lr": NoEffect(_ADAPTERS),
        "adapter_lr": NoEffect(_ADAPTERS),
        "train_refiner": NoEffect(_ADAPTERS),
        "attention_backend": NoEffect(_SPEED),
        "xformers": NoEffect(_SPEED),
        "sdp": NoEffect(_SPEED),
        "max_loss_debug": NoEffect("debug output only"),
        "show_turbo_outputs": NoEffect("debug output only"),
        "switch_boundary_every": NoEffect("two-stage video models only"),
        "audio_loss_multiplier": NoEffect(_AUDIO),
        "next_sample_timesteps": _with("timestep_type next_sample"),
        "adapter_assist_type": _with("adapter_assist_name_or_path"),
        "batch_noise_correction_scale": _with("do_batch_noise_correction"),
        "signal_amplification_strength": _with("do_signal_amplification"),
        "signal_correction_noise_scale": _with("do_signal_correction_noise"),
        "blank_prompt_preservation_multiplier": _with("blank_prompt_preservation"),
        "inverted_mask_prior_multiplier": _with("inverted_mask_prior"),
        "correct_pred_norm_multiplier": _with("correct_pred_norm"),
        "merge_network_on_save_strength": _with("merge_network_on_save"),
        "paramiter_swapping_factor": _with("do_paramiter_swapping"),
        "differential_guidance_scale": _with("do_differential_guidance"),
        "target_norm_std_value": _with("target_norm_std"),
        "latent_feature_loss_weight": _with("latent_feature_extractor_path"),
        "diffusion_feature_extractor_weight": _with("diffusion_feature_extractor_path"),
        "cfg_scale": _with("do_cfg"),
        "max_cfg_scale": _with("do_random_cfg"),
        "cfg_rescale": _with("do_cfg"),
        "max_negative_prompts": _with("negative_prompt"),
        "do_guidance_loss_cfg_zero": _with("do_guidance_loss"),
        "guidance_loss_target": _with("do_guidance_loss"),
        "guidance_loss_schedule": _with("do_guidance_loss"),
        "unconditional_prompt": _with("do_guidance_loss"),
        "loss_target": Unsupported(("noise",), _FLOW),
        "min_snr_gamma": Unsupported(EMPTY, "min-SNR loss weighting is not implemented"),
        "snr_gamma": Unsupported(EMPTY, "SNR loss weighting is not implemented"),
        "learnable_snr_gos": Unsupported((False,), "learnable SNR weighting is not implemented"),
        "noise_offset": Unsupported(EMPTY, _NOISE),
        "dynamic_noise_offset": Unsupported((False,), _NOISE),
        "noise_multiplier": Unsupported((1, 1.0), _NOISE),
        "target_noise_multiplier": Unsupported((1, 1.0), _NOISE),
        "random_noise_multiplier": Unsupported(EMPTY, _NOISE),
        "random_noise_shift": Unsupported(EMPTY, _NOISE),
        "do_signal_correction_noise": Unsupported((False,), _NOISE),
        "do_batch_noise_correction": Unsupported((False,), _NOISE),
        "do_signal_amplification": Unsupported((False,), _NOISE),
        "force_consistent_noise": Unsupported((False,), _NOISE),
        "blended_blur_noise": Unsupported((False,), _NOISE),
        "optimal_noise_pairing_samples": Unsupported((1,), _NOISE),
        "img_multiplier": Unsupported((1, 1.0), "input scaling is not implemented"),
        "latent_multiplier": Unsupported((1, 1.0), "input scaling is not implemented"),
        "noisy_latent_multiplier": Unsupported((1, 1.0), "input scaling is not implemented"),
        "pred_scaler": Unsupported((1, 1.0), "prediction scaling is not implemented"),
        "standardize_images": Unsupported((False,), "input standardization is not implemented"),
        "standardize_latents": Unsupported((False,), "input standardization is not implemented"),
        "adaptive_scaling_factor": Unsupported((False,), "an adaptive VAE scaling factor is not implemented"),
        "match_noise_norm": Unsupported((False,), _FLOW),
        "correct_pred_norm": Unsupported((False,), _FLOW),
        "t0_loss_target": Unsupported((False,), _FLOW),
        "t0_velocity_equiv_weight": Unsupported((False,), _FLOW),
        "do_fft_loss": Unsupported((False,), "extra losses are not implemented"),
        "do_fft_velocity_equiv_weight": Unsupported((False,), "extra losses are not implemented"),
        "do_prior_divergence": Unsupported((False,), "extra losses are not implemented"),
        "do_blank_stabilization": Unsupported((False,), "extra losses are not implemented"),
        "do_guidance_loss": Unsupported((False,), "extra losses are not implemented"),
        "do_differential_guidance": Unsupported((False,), "extra losses are not implemented"),
        "target_norm_std": Unsupported(EMPTY, "extra losses are not implemented"),
        "latent_feature_extractor_path": Unsupported(EMPTY, "feature-extractor losses are not implemented"),
        "diffusion_feature_extractor_path": Unsupported(EMPTY, "feature-extractor losses are not implemented"),
        "max_loss": Unsupported(EMPTY, "loss clipping is not implemented"),
        "inverted_mask_prior": Unsupported((False,), "masked training is not implemented"),
        "blank_prompt_preservation": Unsupported((False,), "blank prompt preservation is not implemented"),
        "do_cfg": Unsupported((False,), "training with classifier-free guidance is not implemented"),
        "do_random_cfg": Unsupported((False,), "training with classifier-free guidance is not implemented"),
        "negative_prompt": Unsupported(EMPTY, "training with classifier-free guidance is not implemented"),
        "bypass_guidance_embedding": Unsupported((False,), "ai-toolkit then leaves the guidance embedding out of "
                                                           "the conditioning of training predictions (not of samples), "
                                                           "a de-distillation setting; not implemented"),
        "linear_timesteps": Unsupported((False,), "use train.timestep_type"),
        "linear_timesteps2": Unsupported((False,), "use train.timestep_type"),
        "min_denoising_steps": Unsupported((0,), "a timestep range is not implemented"),
        "max_denoising_steps": Unsupported((999,), "a timestep range is not implemented"),
        "num_train_timesteps": Unsupported((1000,), "the flow-matching schedule has 1000 steps here"),
        "prompt_dropout_prob": Unsupported(EMPTY, "use datasets[].caption_dropout_rate"),
        "prompt_saturation_chance": Unsupported(EMPTY, "prompt repetition is not implemented"),
        "short_and_long_captions": Unsupported((False,), "JSON caption files are not implemented"),
        "short_and_long_captions_encoder_split": Unsupported((False,), "JSON caption files are not implemented"),
        "single_item_batching": Unsupported((False,), "use train.gradient_accumulation_steps"),
        "start_step": Unsupported(EMPTY, "starting at a given step is not implemented; resume from a state"),
        "weight_jitter": Unsupported(EMPTY, "weight jitter is not implemented"),
        "merge_network_on_save": Unsupported((False,), "merging the LoRA into saved model weights is not "
                                                       "implemented"),
        "do_paramiter_swapping": Unsupported((False,), "parameter swapping is not implemented"),
        "free_u": Unsupported((False,), "FreeU is not implemented"),
        "train_turbo": Unsupported((False,), "turbo training is not implemented"),
        "adapter_assist_name_or_path": Unsupported(EMPTY, "assistant adapters are not implemented"),
        "match_adapter_assist": Unsupported((False,), "assistant adapters are not implemented"),
        "match_adapter_chance": Unsupported(EMPTY, "assistant adapters are not implemented"),
        "validation_config": Unsupported(EMPTY, "use datasets[].val_folder_path for held-out validation loss"),
    },
    "train.ema_config": {
        "use_feedback": Unsupported((False,), "EMA feedback is not implemented"),
        "param_multiplier": Unsupported((1, 1.0), "EMA parameter scaling is not implemented"),
    },
    "datasets[]": {
        "caption_type": Mapped("caption_ext", "older spelling of caption_ext"),
        "control_path_1": Mapped("control_path", "first of several control folders (a control_path list here)"),
        "control_path_2": Mapped("control_path", "second of several control folders (a control_path list here)"),
        "control_path_3": Mapped("control_path", "third of several control folders (a control_path list here)"),
        "cache_text_embeddings": Mapped("train.cache_text_embeddings", "all datasets or none, as in ai-toolkit"),
        "num_workers": NoEffect(_SPEED + "; see train.num_workers"),
        "prefetch_factor": NoEffect(_SPEED),
        "cache_latents_num_workers": NoEffect(_SPEED),
        "load_image_when_caching_latents": NoEffect(_SPEED),
        "cache_tensors_to_disk": NoEffect(_SPEED),
        "cache_clip_vision_to_disk": NoEffect(_ADAPTERS),
        "fast_image_size": NoEffect(_SPEED),
        "debug": NoEffect("debug output only"),
        "guidance_type": NoEffect("guidance (slider) datasets only"),
        "clip_image_path": NoEffect(_ADAPTERS),
        "clip_image_from_same_folder": NoEffect(_ADAPTERS),
        "clip_image_augmentations": NoEffect(_ADAPTERS),
        "clip_image_shuffle_augmentations": NoEffect(_ADAPTERS),
        "fps": NoEffect(_VIDEO),
        "shrink_video_to_frames": NoEffect(_VIDEO),
        "trim_auto_frame_count_tail": NoEffect(_VIDEO),
        "audio_normalize": NoEffect(_AUDIO),
        "audio_preserve_pitch": NoEffect(_AUDIO),
        "num_controls_from_same_folder": _with("control_from_same_folder"),
        "random_triggers_max": _with("random_triggers"),
        "shuffle_augmentations": _with("augmentations"),
        "replay_transforms": _with("augmentations"),
        "diff_output_preservation_class": NoEffect("ai-toolkit copies it from the train section"),
        "num_frames": Unsupported((1,), "video training is not implemented"),
        "auto_frame_count": Unsupported((False,), "video training is not implemented"),
        "do_i2v": Unsupported((False,), "video training is not implemented"),
        "do_audio": Unsupported((False,), "audio training is not implemented"),
        "diff_output_preservation": NoEffect("ai-toolkit copies it from train.diff_output_preservation"),
        "type": Unsupported(("image",), "only image datasets are implemented"),
        "dataset_path": Unsupported(EMPTY, "use folder_path"),
        "batch_size": Unsupported(EMPTY, "use train.batch_size"),
        "alpha_mask": Unsupported((False,), "masked loss is not implemented"),
        "unconditional_path": Unsupported(EMPTY, "unconditional images are not implemented"),
        "inpaint_path": Unsupported(EMPTY, "inpainting is not implemented"),
        "controls": Unsupported(EMPTY, "ai-toolkit makes these control images from each target with extra models "
                                       "(depth, line, pose, inpaint, mask); make them yourself and list their "
                                       "folder in control_path"),
        "control_from_same_folder": Unsupported((False,), "controls are paired by file name here"),
        "control_transparent_color": Unsupported(([0, 0, 0],), "another fill color for transparent control "
                                                               "images is not implemented"),
        "full_size_control_images": Mapped("control_resolution", "false: control images at about 512x512 pixels "
                                           "(ai-toolkit squashes them to 512x512 and its Kontext scales them back up "
                                           "to the target's size, so no tokens are saved there; here they keep the "
                                           "target's crop and aspect and their tokens shrink)",
                                           convert=lambda full: None if full else 512),
        "prior_reg": Unsupported((False,), "prior regularisation (the base model's prediction as the target of "
                                           "regularisation images) is not implemented; is_reg is"),
        "random_triggers": Unsupported(EMPTY, "random trigger words are not implemented"),
        "replacements": Unsupported(EMPTY, "caption replacements are not implemented"),
        "use_short_captions": Unsupported((False,), "JSON caption files are not implemented"),
        "augments": Unsupported(EMPTY, "augmentations are not implemented"),
        "augmentations": Unsupported(EMPTY, "augmentations are not implemented"),
        "random_scale": Unsupported((False,), "random scaling is not implemented"),
        "scale": Unsupported((1, 1.0), "image scaling is not implemented"),
        "square_crop": Unsupported((False,), "square crops are not implemented; images are bucketed"),
        "buckets": Unsupported((True,), "images are always bucketed here"),
        "bucket_tolerance": Unsupported((64,), "another bucket tolerance is not implemented"),
        "extra_values": Unsupported(EMPTY, "extra conditioning values are not implemented"),
        "standardize_images": Unsupported((False,), "input standardization is not implemented"),
        "poi": Unsupported(EMPTY, "ai-toolkit itself no longer supports it"),
    },
    "sample": {
        "samples": _samples_rule("each item becomes one prompt with --ctrl_img/--w/--h/--seed/--cfg/--steps flags"),
        "fps": NoEffect(_VIDEO),
        "format": NoEffect("sample images are written as PNG here"),
        "guidance_rescale": NoEffect("ai-toolkit's Kontext sampler does not use it"),
        "adapter_conditioning_scale": NoEffect(_ADAPTERS),
        "refiner_start_at": NoEffect(_ADAPTERS),
        "extra_values": NoEffect("ai-toolkit's Kontext sampler does not use them"),
        "do_cfg_norm": NoEffect("other architectures only"),
        "network_multiplier": Unsupported((1, 1.0), "samples use the LoRA at strength 1"),
        "num_frames": Unsupported((1,), "video sampling is not implemented"),
    },
    "sample.samples[]": {
        "prompt": _samples_rule("the prompt text"),
        "ctrl_img": _samples_rule("--ctrl_img"),
        "ctrl_img_1": _samples_rule("--ctrl_img (the first control image)"),
        "ctrl_img_2": _samples_rule("a second --ctrl_img"),
        "ctrl_img_3": _samples_rule("a third --ctrl_img"),
        "width": _samples_rule("--w"),
        "height": _samples_rule("--h"),
        "seed": _samples_rule("--seed"),
        "guidance_scale": _samples_rule("--cfg"),
        "sample_steps": _samples_rule("--steps"),
        "neg": NoEffect("Kontext samples use no negative prompt, here or in ai-toolkit"),
        "fps": NoEffect(_VIDEO),
        "ctrl_idx": NoEffect("other architectures only"),
        "do_cfg_norm": NoEffect("other architectures only"),
        "network_multiplier": Unsupported((1, 1.0), "samples use the LoRA at strength 1"),
        "num_frames": Unsupported((1,), "video sampling is not implemented"),
    },
}

# Our dataclass of each TABLE section that we also have ("logging" and "sample.samples[]" are ai-toolkit's only).
SECTIONS: dict[str, type] = {
    "top": JobConfig, "config": RootConfig, "process": TrainProcessConfig, "network": NetworkConfig,
    "save": SaveConfig, "model": ModelConfig, "train": TrainConfig, "train.ema_config": EMAConfig,
    "sample": SampleConfig, "datasets[]": DatasetConfig,
}

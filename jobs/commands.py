"""The run.py subcommands: `generate`, `compare`, `convert-lora`, `push` and `plan` (`python run.py CONFIG` trains).

Each takes its argv (without the subcommand) and returns an exit status; run.py turns UserError into exit 2.
`generate` builds the same typed config a `type: generate` YAML gives, so both are validated by one schema.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from toolkit.errors import UserError

log = logging.getLogger(__name__)


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py generate", description="Render prompts on control images with the base model and each LoRA, "
        "side by side (PNG per image with its parameters, and a contact sheet).")
    p.add_argument("--model", required=True, help="base model: diffusers folder or Hub id")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA file (diffusers or ComfyUI/kohya layout); repeat for several")
    p.add_argument("--lora-scale", type=float, action="append", default=[], metavar="S",
                   help="strength of the LoRAs: once for all, or once per --lora in order (default 1)")
    p.add_argument("--ctrl-img", required=True, metavar="IMG|FOLDER", help="control image or folder of images")
    p.add_argument("--prompt", action="append", required=True, help="edit instruction; repeat for several")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--guidance", type=float, default=2.5, help="guidance scale (default 2.5)")
    p.add_argument("--seed", type=int, default=42, help="seed of every image (default 42)")
    p.add_argument("--width", type=int, help="output width; default: the control's aspect ratio at ~1 megapixel")
    p.add_argument("--height", type=int, help="output height (with --width)")
    p.add_argument("--batch-size", type=int, default=1, help="images rendered together (default 1)")
    p.add_argument("--out", default="output/generate", help="output folder (default output/generate)")
    p.add_argument("--quantize", action="store_true", help="8-bit transformer weights (optimum-quanto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--dtype", default="bf16", help="compute dtype on GPU (CPU always uses float32)")
    p.add_argument("--arch", default="flux_kontext", help="model architecture (default flux_kontext)")
    p.add_argument("--trigger", default=None, help="replaces [trigger] in the prompts")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 prompt tokens (default 512)")
    p.add_argument("--no-base", action="store_true", help="skip the base model column")
    return p


def generate_job_dict(args: argparse.Namespace) -> dict:
    """The `type: generate` job config equivalent to the command line."""
    count = len(args.lora)
    if len(args.lora_scale) not in (0, 1, count):
        raise UserError(f"--lora-scale given {len(args.lora_scale)} times for {count} --lora: give it once for all, "
                        "or once per --lora")
    scales = args.lora_scale if len(args.lora_scale) == count else (args.lora_scale or [1.0]) * count
    out = Path(args.out)
    return {"job": "extension", "config": {"name": out.name or "generate", "process": [{
        "type": "generate", "output_folder": str(out.parent), "device": args.device, "dtype": args.dtype,
        "trigger_word": args.trigger,
        "model": {"name_or_path": args.model, "arch": args.arch, "quantize": args.quantize,
                  "max_sequence_length": args.max_sequence_length},
        "loras": [{"path": path, "scale": scale} for path, scale in zip(args.lora, scales)],
        "generate": {"prompts": args.prompt, "ctrl_img": args.ctrl_img, "width": args.width, "height": args.height,
                     "sample_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
                     "batch_size": args.batch_size, "include_base": not args.no_base},
    }]}}


def generate_main(argv: Sequence[str]) -> int:
    parser = _generate_parser()
    args = parser.parse_args(argv)  # before the heavy imports: --help and flag errors come at once
    if (args.width is None) != (args.height is None):
        parser.error("give --width and --height together (or neither: the control's aspect ratio at ~1 megapixel)")
    from jobs.ExtensionJob import ExtensionJob
    from toolkit.config.loader import load_job_dict

    job = load_job_dict(generate_job_dict(args), "run.py generate (command line)", environ={})
    ExtensionJob(job).run()
    return 0


def compare_main(argv: Sequence[str]) -> int:
    from toolkit.train.metric_names import HIGHER_IS_BETTER

    p = argparse.ArgumentParser(prog="run.py compare", description="Render a training run's sample prompts with "
                                "every checkpoint into one grid, and plot its validation loss against step.")
    p.add_argument("folder", help="the run's output folder: <training_folder>/<name>")
    p.add_argument("--out", default=None, help="where to write (default FOLDER/compare)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--sample-steps", type=int, default=None, help="override sample.sample_steps")
    p.add_argument("--batch-size", type=int, default=1, help="prompts rendered together (default 1)")
    p.add_argument("--no-grid", action="store_true", help="only the validation loss")
    p.add_argument("--no-val", action="store_true", help="only the image grid")
    p.add_argument("--val-folder", default=None, help="held-out targets (overrides the config's val_folder_path)")
    p.add_argument("--val-control", default=None, help="held-out controls (overrides val_control_path)")
    p.add_argument("--best", default=None, choices=list(HIGHER_IS_BETTER), metavar="METRIC",
                   help="print the checkpoint with the best value of METRIC on the held-out pairs: "
                        f"{', '.join(HIGHER_IS_BETTER)} (psnr/ssim higher is better; val_loss/lpips lower)")
    p.add_argument("--metric-steps", type=int, default=None,
                   help="denoising steps of the edit metrics (overrides sample.metric_steps; 0: none)")
    args = p.parse_args(argv)
    if (args.val_folder is None) != (args.val_control is None):
        p.error("give --val-folder and --val-control together")
    from jobs.compare import compare_run
    from jobs.extensions import load_extensions

    load_extensions()
    if args.best is not None and args.no_val:
        p.error("--best measures the held-out pairs: drop --no-val")
    result = compare_run(Path(args.folder), out=args.out, device=args.device, sample_steps=args.sample_steps,
                         batch_size=args.batch_size, grid=not args.no_grid, val=not args.no_val,
                         val_folder=args.val_folder, val_control=args.val_control, best=args.best,
                         metric_steps=args.metric_steps)
    if result.best is not None:  # the answer on stdout (logs go to stderr), for scripts
        checkpoint, value = result.best
        sys.stdout.write(f"best {args.best}: step {checkpoint.step} {checkpoint.path or 'base model'} "
                         f"({args.best} = {value:.6g})\n")
    return 0


def convert_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py convert-lora", description="Convert a LoRA between the diffusers "
                                "layout (transformer.*.lora_A/B) and the ComfyUI/kohya layout (lora_unet_*, "
                                "original model names, fused qkv); converting back gives identical tensors.")
    p.add_argument("src", help="input .safetensors")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--to", required=True, choices=("comfy", "diffusers"), help="layout to write")
    p.add_argument("--arch", default="flux_kontext", help="model architecture (default flux_kontext)")
    args = p.parse_args(argv)
    from jobs.extensions import load_extensions
    from toolkit.adapters.lora_convert import convert_file, get_conventions

    load_extensions()
    convert_file(Path(args.src), Path(args.dst), args.to, get_conventions(args.arch))
    log.info("wrote %s (%s layout)", args.dst, args.to)
    return 0


def push_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py push", description="Upload a finished training run to the Hugging Face "
                                "Hub: the final LoRA, the latest samples and a generated model card (README.md, also "
                                "written into the run folder). The token comes from HF_TOKEN (environment or .env) or "
                                "`hf auth login`.")
    p.add_argument("folder", help="the run's output folder: <training_folder>/<name>")
    p.add_argument("--repo-id", default=None, help="namespace/name (default: save.hf_repo_id of the run's config)")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="create the repository private (default: save.hf_private)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repository public")
    p.add_argument("--dry-run", action="store_true", help="write the model card and list the files; upload nothing")
    args = p.parse_args(argv)
    from jobs.extensions import load_extensions
    from jobs.push import push_run

    load_extensions()  # the architectures' model card facts
    push_run(Path(args.folder), repo_id=args.repo_id, private=args.private, dry_run=args.dry_run)
    return 0


PLAN_DOES_NOT_FIT = 3  # exit status of `plan --gpu-memory` when the plan exceeds it (2: a bad config or flag)


def plan_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py plan", description="Plan a training config's device memory before any "
                                "weight loads: bytes per part (weights by format, text encoders, VAE, trained "
                                "weights, gradients, optimizer states, EMA, activations of the largest bucket traced "
                                "on fake tensors), the loading and training peaks, and what to change when it does "
                                "not fit. Exit status 0, or %d when the peak exceeds --gpu-memory." % PLAN_DOES_NOT_FIT)
    p.add_argument("config", help="a training config (path, or name under config/)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help="device memory to plan for, in GiB (default: no verdict; the advice is always shown)")
    p.add_argument("--process", type=int, default=0, help="which config.process entry (default 0)")
    p.add_argument("--preset", default=None,
                   help="plan a published model from config values shipped as facts instead of model.name_or_path "
                        "(flux_kontext: flux-kontext-dev)")
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="plan this largest bucket side instead of the datasets' largest resolution")
    args = p.parse_args(argv)
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        p.error("--gpu-memory must be > 0")
    from jobs.extensions import load_extensions
    from jobs.plan import plan_config

    load_extensions()
    plan, text = plan_config(args.config, args.gpu_memory, args.process, args.preset, args.resolution)
    sys.stdout.write(text + "\n")
    return PLAN_DOES_NOT_FIT if plan.fits is False else 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "generate": generate_main, "compare": compare_main, "convert-lora": convert_main, "push": push_main,
    "plan": plan_main}

__all__ = ["COMMANDS", "PLAN_DOES_NOT_FIT", "compare_main", "convert_main", "generate_job_dict", "generate_main",
           "plan_main", "push_main"]

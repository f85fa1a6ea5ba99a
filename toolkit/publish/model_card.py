"""The model card (README.md) of a pushed LoRA: YAML front matter the Hub reads (base_model, license, tags,
instance_prompt, widget) and a body with the trigger word, example prompts with their samples, usage and the
training settings.

Architecture-specific parts (tags, licenses of known base models, a usage snippet) come from a `CardInfo`
that each extension registers; toolkit/ never names an architecture. `model_card` is pure apart from reading a
local base model's README for its license; secret values (HF_TOKEN...) are removed from the result whatever
the inputs held.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from toolkit.config.schema import TrainProcessConfig
from toolkit.publish.hub import SAMPLE_DIR, Samples
from toolkit.redact import redact_text
from toolkit.registry import Registry
from toolkit.render.sampling import parse_prompt_flags

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass(frozen=True)
class CardInfo:
    """What a model card says about one architecture."""

    title: str  # e.g. "FLUX.1 Kontext"
    tags: tuple[str, ...]
    pipeline_tag: Optional[str] = None
    default_base: Optional[str] = None  # Hub id used in the usage snippet when the base is a local folder
    licenses: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # Hub id -> license front matter
    #: Python snippet; format fields: {base}, {repo_id}, {weight_name}, {prompt}
    usage: Optional[str] = None


_CARD_INFO: Registry[CardInfo] = Registry(lambda name, known: KeyError(name))  # only find(): unknown -> generic


def register_card_info(arch: str, info: CardInfo) -> None:
    _CARD_INFO.add(arch, info)


def find_card_info(arch: str) -> CardInfo:
    return _CARD_INFO.find(arch) or CardInfo(title=arch, tags=("lora",))


@dataclass(frozen=True)
class RunFacts:
    """What the card needs besides the config: where it goes and what the run produced."""

    name: str
    repo_id: str
    weight_name: str  # the LoRA file in the repository
    samples: Optional[Samples] = None
    sample_images_uploaded: bool = False
    dataset_size: Optional[int] = None  # image pairs
    world_size: int = 1


def hub_base_model(name_or_path: str) -> Optional[str]:
    """The Hub id of the base model: the id itself, or the one in a Hub cache path (models--org--name); None for
    another local folder (the Hub rejects a base_model that is not a repository id)."""
    path = Path(name_or_path).expanduser()
    for part in path.parts:
        if part.startswith("models--") and len(part.split("--")) == 3:
            return "/".join(part.split("--")[1:])
    if path.exists() or not _HUB_ID.fullmatch(name_or_path):
        return None
    return name_or_path


def base_license(name_or_path: str, hub_id: Optional[str], info: CardInfo) -> dict[str, str]:
    """License front matter of the base model: known for the architecture's Hub models, else read from a local
    folder's README.md (a Hub snapshot has one); empty when unknown."""
    if hub_id in info.licenses:
        return dict(info.licenses[hub_id])
    readme = Path(name_or_path).expanduser() / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(readme) or {}
    return {key: str(meta[key]) for key in _LICENSE_KEYS if meta.get(key)}


def example_prompts(cfg: TrainProcessConfig) -> list[str]:
    """The sample prompts as a user types them: trigger word in, --ctrl_img and other flags out."""
    return [parse_prompt_flags(p)[0] for p in cfg.sample.prompts]


def front_matter(cfg: TrainProcessConfig, facts: RunFacts, info: CardInfo) -> dict[str, Any]:
    hub_id = hub_base_model(cfg.model.name_or_path)
    meta: dict[str, Any] = {}
    if hub_id:
        meta["base_model"] = hub_id
    meta.update(base_license(cfg.model.name_or_path, hub_id, info))
    meta["library_name"] = "diffusers"
    if info.pipeline_tag:
        meta["pipeline_tag"] = info.pipeline_tag
    meta["tags"] = list(dict.fromkeys([*info.tags, "lora", "template:sd-lora", "kontext-trainer"]))
    if cfg.trigger_word:
        meta["instance_prompt"] = cfg.trigger_word
    if facts.sample_images_uploaded and facts.samples is not None:
        prompts = example_prompts(cfg)
        meta["widget"] = [{"text": prompts[i], "output": {"url": f"{SAMPLE_DIR}/{path.name}"}}
                          for i, path in sorted(facts.samples.images.items()) if i < len(prompts)]
    return meta


def training_settings(cfg: TrainProcessConfig, facts: RunFacts) -> list[tuple[str, str]]:
    train, net = cfg.train, cfg.network
    optimizer = train.optimizer + (f" ({', '.join(f'{k}={v}' for k, v in train.optimizer_params.items())})"
                                   if train.optimizer_params else "")
    effective = train.batch_size * facts.world_size * train.gradient_accumulation_steps
    resolutions = sorted({r for d in cfg.datasets for r in d.resolution})
    quantized = f"{cfg.model.qtype} transformer" if cfg.model.quantize else "no"
    return [
        ("steps", str(train.steps)),
        ("learning rate", f"{train.lr:g} ({train.lr_scheduler}, {train.lr_warmup_steps} warm-up steps)"),
        ("optimizer", optimizer),
        ("LoRA rank / alpha", f"{net.linear} / {net.linear_alpha:g}"
         + (f", dropout {net.dropout:g}" if net.dropout else "")),
        ("batch", f"{train.batch_size} per process x {facts.world_size} processes x "
                  f"{train.gradient_accumulation_steps} accumulation = {effective}"),
        ("resolution", ", ".join(f"{r} px" for r in resolutions) + " (aspect-ratio buckets)"),
        ("dataset", f"{facts.dataset_size} image pairs" if facts.dataset_size is not None else "unknown"),
        ("caption dropout", ", ".join(f"{d.caption_dropout_rate:g}" for d in cfg.datasets)),
        ("timestep sampling", train.timestep_type),
        ("training guidance", f"{train.guidance:g}"),
        ("precision", f"{train.dtype}, 8-bit base: {quantized}"),
        ("seed", str(train.seed)),
        ("saved as", f"{cfg.save.dtype}, {cfg.save.format} keys"),
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def model_card(cfg: TrainProcessConfig, facts: RunFacts) -> str:
    """The README.md text for the run's Hub repository."""
    info = find_card_info(cfg.model.arch)
    meta = front_matter(cfg, facts, info)
    base = meta.get("base_model")
    prompts = example_prompts(cfg)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000).rstrip(), "---", "",
             f"# {facts.name}", "",
             f"A {info.title} LoRA" + (f" for [{base}](https://huggingface.co/{base})" if base else
                                       f" (base model: {Path(cfg.model.name_or_path).name})")
             + f", trained for {cfg.train.steps} steps with kontext-trainer.", ""]
    if facts.sample_images_uploaded:
        lines += ["<Gallery />", ""]
    lines += ["## Trigger word", ""]
    lines += ([f"Use `{cfg.trigger_word}` in the prompt.", ""] if cfg.trigger_word
              else ["No trigger word: the LoRA was trained on the captions as they are.", ""])
    if prompts:
        lines += _prompt_section(prompts, facts)
    lines += ["## Download", "", f"[{facts.weight_name}](./{facts.weight_name}) (safetensors, "
              f"{cfg.save.format} key layout; loads in diffusers and ComfyUI).", ""]
    if info.usage:
        prompt = prompts[0] if prompts else (cfg.trigger_word or "")
        lines += ["## Use it with diffusers", "", "```python",
                  info.usage.format(base=base or info.default_base or cfg.model.name_or_path,
                                    repo_id=facts.repo_id, weight_name=facts.weight_name,
                                    prompt=prompt.replace("\\", "\\\\").replace('"', '\\"')).rstrip(),
                  "```", ""]
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in training_settings(cfg, facts)]
    return redact_text("\n".join(lines) + "\n")


def _prompt_section(prompts: list[str], facts: RunFacts) -> list[str]:
    samples = facts.samples
    lines = ["## Example prompts", ""]
    if samples is not None and facts.sample_images_uploaded:
        lines += [f"| prompt | sample at step {samples.step} |", "|---|---|"]
        for i, prompt in enumerate(prompts):
            image = samples.images.get(i)
            cell = f"![sample {i}]({SAMPLE_DIR}/{image.name})" if image is not None else "-"
            lines.append(f"| {_cell(prompt)} | {cell} |")
    else:
        lines += [f"- {prompt}" for prompt in prompts]
    lines.append("")
    if samples is not None and samples.sheet is not None:
        lines += [f"Contact sheet at step {samples.step} (control image, then the result, per prompt):", "",
                  f"![samples at step {samples.step}]({SAMPLE_DIR}/{samples.sheet.name})", ""]
    return lines


__all__ = ["CardInfo", "RunFacts", "base_license", "example_prompts", "find_card_info", "front_matter",
           "hub_base_model", "model_card", "register_card_info", "training_settings"]

"""Rewrite a raw job from ai-toolkit's keys to ours with the tables of ``aitoolkit.py``, before type conversion.

Pure functions on parsed YAML: they return a rewritten copy, the key paths dropped as having no effect here (the
loader logs them in one line) and the problems (refused values, conflicts, typos near an ai-toolkit key), which the
loader reports together with every other problem of the config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Optional

from toolkit.config.aitoolkit import SECTIONS, TABLE
from toolkit.config.aitoolkit_caption import CAPTION_QTYPES, CAPTION_TABLE, OTHER_CAPTIONERS
from toolkit.config.aitoolkit_rules import DROP, Mapped, NoEffect, Refused, Rule, Unsupported, same_value
from toolkit.config.aitoolkit_values import VALUE_PATTERNS, VALUES
from toolkit.config.caption_schema import CAPTION_TYPES

__all__ = ["Translation", "ai_toolkit_help", "translate_caption_process", "translate_job", "translate_process"]


@dataclass
class Translation:
    """What a translation did: the rewritten ``data`` (a process or a whole job), the key paths dropped as having no
    effect here, and the problems (refused values, conflicts, unknown keys in ai-toolkit-only sections)."""

    data: dict
    no_effect: list[str]
    problems: list[str]


def translate_job(raw: dict) -> Translation:
    """``translate_process`` on every training process of a raw job and ``translate_caption_process`` on every
    caption process (``job: generate`` processes and processes of type generate are left alone), plus ai-toolkit's keys of the ``config`` section. The input is not changed."""
    out = Translation(copy.deepcopy(raw), [], [])
    root = out.data.get("config")
    if not isinstance(root, dict):
        return out
    for key, rule in TABLE["config"].items():
        if key in root:
            _apply(root, key, rule, root, f"config.{key}", out)
    _near_misses(root, "config", "config", out)
    processes = root.get("process")
    for index, process in enumerate(processes if isinstance(processes, list) else []):
        kind = process.get("type", "generate" if raw.get("job") == "generate" else "sd_trainer") \
            if isinstance(process, dict) else None
        if kind in OTHER_CAPTIONERS:
            out.problems.append(_refusal(f"config.process[{index}].type", kind, OTHER_CAPTIONERS[kind]))
            kind = process["type"] = "captioner"
        if kind is not None and kind != "generate":
            translate = translate_caption_process if kind in CAPTION_TYPES else translate_process
            done = translate(process, f"config.process[{index}]")
            processes[index] = done.data
            out.no_effect += done.no_effect
            out.problems += done.problems
    return out


def translate_process(raw: dict, path: str) -> Translation:
    """Rewrite one raw training process (a dict from YAML) from ai-toolkit's keys to ours.

    ``path`` is the process's key path (``config.process[0]``). The input is not changed. Mapped keys are moved
    (conflicts with a key already set are problems), no-effect keys are removed and listed, and unsupported values
    are removed and reported as problems. Keys that are neither ours nor in ``TABLE`` are left for the strict
    conversion to report (with its did-you-mean).
    """
    out = Translation(copy.deepcopy(raw), [], [])
    proc = out.data
    logging_section = proc.pop("logging", None)  # first: an ai-toolkit-only section, not a typo of a process key
    if logging_section is not None:
        _foreign_section(logging_section, "logging", path, out)
    _section(proc, "process", "", path, out)
    if isinstance(proc.get("model"), dict):
        _model_kwargs(proc["model"], f"{path}.model", out)
    for name in ("network", "save", "model", "train", "sample"):
        if isinstance(proc.get(name), dict):
            _section(proc[name], name, name, path, out)
    train = proc.get("train")
    if isinstance(train, dict) and isinstance(train.get("ema_config"), dict):
        _section(train["ema_config"], "train.ema_config", "train.ema_config", path, out)
    if isinstance(proc.get("network"), dict):
        _network_kinds(proc["network"], f"{path}.network", out)
    datasets = proc.get("datasets")
    for index, dataset in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(dataset, dict):
            _dataset(dataset, f"{path}.datasets[{index}]", out)
    if isinstance(datasets, list):
        _dataset_text_cache(datasets, path, out)
    if isinstance(proc.get("sample"), dict):
        _samples(proc["sample"], f"{path}.sample", out)
    _prodigy_lr(proc, path, out)
    return out


def _model_kwargs(model: dict, where: str, out: Translation) -> None:
    """ai-toolkit's model.model_kwargs.match_target_res is our model.match_target_res; the remaining model_kwargs
    (none: the key goes) are left for the table, which refuses any that is set."""
    kwargs = model.get("model_kwargs")
    if not isinstance(kwargs, dict) or "match_target_res" not in kwargs:
        return
    _set(model, "match_target_res", kwargs.pop("match_target_res"), f"{where}.model_kwargs.match_target_res", out)
    if not kwargs:
        del model["model_kwargs"]


def translate_caption_process(raw: dict, path: str) -> Translation:
    """Rewrite one raw caption process from ai-toolkit's keys to ours (``CAPTION_TABLE``); the input is not
    changed. ai-toolkit's qtype spellings are mapped; a qtype we lack is refused only when quantize is on."""
    out = Translation(copy.deepcopy(raw), [], [])
    proc = out.data
    caption = proc.get("caption")
    if isinstance(caption, dict):
        for key, rule in CAPTION_TABLE["caption"].items():
            if key in caption:
                _apply(caption, key, rule, proc, f"{path}.caption.{key}", out)
        if "qtype" in caption and isinstance(caption["qtype"], str):
            qtype = CAPTION_QTYPES.get(caption["qtype"])
            if qtype is not None:
                caption["qtype"] = qtype
            elif caption.get("quantize") is not True:
                del caption["qtype"]
                out.no_effect.append(f"{path}.caption.qtype")
    for key, rule in CAPTION_TABLE["process"].items():
        if key in proc:
            _apply(proc, key, rule, proc, f"{path}.{key}", out)
    return out


def _refusal(where: str, value: Any, why: str, off: Any = None) -> str:
    """The problem line of a value that would change training in a way not implemented here."""
    todo = "remove the key" + (f" or set it to {off!r}, ai-toolkit's default" if off is not None else "")
    return f"{where}: {value!r} is not supported here ({why}); {todo}"


def _off_text(rule: Unsupported) -> Any:
    return rule.off[0] if isinstance(rule.off, tuple) else None


def _set(proc: dict, target: str, value: Any, where: str, out: Translation) -> None:
    """Write ``value`` at the process-relative ``target``; a different value already there is a conflict."""
    *parents, last = target.split(".")
    node = proc
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
        if not isinstance(node[part], dict):
            return  # not a mapping: the conversion reports it
        node = node[part]
    if last in node and not same_value(node[last], value):
        out.problems.append(f"{where}: is ai-toolkit's spelling of {target}, which is also set (to {node[last]!r}); "
                            f"keep one of them")
        return
    node[last] = value


def _apply(section: dict, key: str, rule: Rule, root: dict, where: str, out: Translation) -> None:
    """Apply one table rule to ``section[key]``; ``root`` is what Mapped targets are relative to."""
    value = section.pop(key)
    if isinstance(rule, NoEffect) or (isinstance(rule, Unsupported) and rule.is_off(value, section)):
        out.no_effect.append(where)
    elif isinstance(rule, Unsupported):
        out.problems.append(_refusal(where, value, rule.why, _off_text(rule)))
    elif rule.unless_set and _get(root, rule.target) is not None:
        out.no_effect.append(where)
    else:
        _set(root, rule.target, rule.convert(value) if rule.convert else value, where, out)


def _get(root: dict, target: str) -> Any:
    node: Any = root
    for part in target.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _section(section: dict, name: str, prefix: str, path: str, out: Translation) -> None:
    """Apply ``TABLE[name]`` and ``VALUES`` to one mapping section of a process (``prefix`` is its key path)."""
    base = f"{path}.{prefix}" if prefix else path
    for key, rule in TABLE.get(name, {}).items():
        if key in section and (name, key) != ("sample", "samples"):  # samples: see _samples
            _apply(section, key, rule, out.data, f"{base}.{key}", out)
    _values(section, name, base, out)
    _near_misses(section, name, base, out)


def _near_misses(section: dict, name: str, base: str, out: Translation) -> None:
    """Unknown keys closest to an ai-toolkit key get that hint here (the conversion's did-you-mean only knows our
    keys); the rest are left to the conversion."""
    fields = {field.name: field for field in dataclasses.fields(SECTIONS[name])}
    ours = set(fields) | {alias for field in fields.values() for alias in field.metadata.get("aliases", ())}
    for key in [key for key in section if isinstance(key, str) and key not in ours and key not in TABLE.get(name, {})]:
        close = difflib.get_close_matches(key.lower(), sorted(ours | set(TABLE.get(name, {}))), n=1, cutoff=0.6)
        if close and close[0] not in ours:
            del section[key]
            out.problems.append(f"{base}.{key}: unknown key; did you mean {close[0]!r} (an ai-toolkit key)?")


def _values(section: dict, name: str, base: str, out: Translation) -> None:
    """Replace ai-toolkit's spellings of our keys' values; refuse the values we do not implement."""
    for vpath in [p for p in set(VALUES) | set(VALUE_PATTERNS) if p.rsplit(".", 1)[0] == name]:
        key = vpath.rsplit(".", 1)[1]
        if key not in section:
            continue
        value = section[key]
        hashable = isinstance(value, (str, int, float, bool, type(None)))
        rule = next((r for v, r in VALUES.get(vpath, {}).items() if hashable and same_value(value, v)), None)
        rule = rule if rule is not None else VALUE_PATTERNS.get(vpath, lambda v: None)(value)
        if isinstance(rule, Refused):
            del section[key]
            out.problems.append(_refusal(f"{base}.{key}", value, rule.why))
        elif rule is DROP:
            del section[key]
        elif rule is not None:
            section[key] = rule


def _foreign_section(section: Any, name: str, path: str, out: Translation) -> None:
    """A whole section that only ai-toolkit has (``logging``): every key has a rule, others are typos."""
    where = f"{path}.{name}"
    if not isinstance(section, dict):
        if section is not None:
            out.problems.append(f"{where}: expected a mapping, got {section!r}")
        return
    for key in list(section):
        rule = TABLE[name].get(key)
        if rule is None:
            close = difflib.get_close_matches(str(key), list(TABLE[name]), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(TABLE[name])}"
            out.problems.append(f"{where}.{key}: unknown key; {hint}")
            section.pop(key)
        else:
            _apply(section, key, rule, out.data, f"{where}.{key}", out)


def _network_kinds(network: dict, where: str, out: Translation) -> None:
    """ai-toolkit writes the LoKr options on every network and reads them only for type lokr."""
    if network.get("type", "lora") != "lora":
        return
    for key in ("lokr_full_rank", "lokr_factor"):
        if key in network:
            del network[key]
            out.no_effect.append(f"{where}.{key}")


def _dataset(dataset: dict, where: str, out: Translation) -> None:
    """One dataset: the table, then ``control_path_1..3`` joined into our control_path list."""
    controls = [dataset.pop(key) for key in ("control_path_1", "control_path_2", "control_path_3") if key in dataset]
    rules = {key: rule for key, rule in TABLE["datasets[]"].items()
             if key != "cache_text_embeddings" and not key.startswith("control_path_")}
    for key, rule in rules.items():
        if key in dataset:
            _apply(dataset, key, rule, dataset, f"{where}.{key}", out)
    _values(dataset, "datasets[]", where, out)
    _near_misses(dataset, "datasets[]", where, out)
    folders = [folder for folder in controls if folder]
    if folders:
        _set(dataset, "control_path", folders if len(folders) > 1 else folders[0], f"{where}.control_path_1", out)
    elif controls:
        out.no_effect.append(f"{where}.control_path_1")


def _dataset_text_cache(datasets: list, path: str, out: Translation) -> None:
    """Per-dataset cache_text_embeddings: ai-toolkit requires all datasets or none; ours is one train switch."""
    flags = [(i, d.pop("cache_text_embeddings")) for i, d in enumerate(datasets)
             if isinstance(d, dict) and "cache_text_embeddings" in d]
    on = [i for i, flag in flags if flag is True]
    if not on:
        out.no_effect.extend(f"{path}.datasets[{i}].cache_text_embeddings" for i, _ in flags)
    elif len(on) < len(datasets):
        out.problems.append(f"{path}.datasets[{on[0]}].cache_text_embeddings: true on some datasets only; use "
                            "train.cache_text_embeddings (all datasets)")
    else:
        _set(out.data, "train.cache_text_embeddings", True, f"{path}.datasets[0].cache_text_embeddings", out)


def _samples(sample: dict, where: str, out: Translation) -> None:
    """``sample.samples`` (the web UI's form) -> ``sample.prompts`` with our inline flags."""
    if "samples" not in sample:
        return
    items = sample.pop("samples")
    if sample.get("prompts"):
        out.problems.append(f"{where}.samples: set samples or prompts, not both")
        return
    if not isinstance(items, list):
        out.problems.append(f"{where}.samples: expected a list of {{prompt, ctrl_img, ...}}, got {items!r}")
        return
    prompts = []
    for index, item in enumerate(items):
        prompt = _sample_prompt(item, f"{where}.samples[{index}]", out)
        if prompt is not None:
            prompts.append(prompt)
    sample["prompts"] = prompts


_SAMPLE_FLAGS = (("width", "w"), ("height", "h"), ("seed", "seed"), ("guidance_scale", "cfg"),
                 ("sample_steps", "steps"))


def _sample_prompt(item: Any, where: str, out: Translation) -> Optional[str]:
    """One ``samples`` item as ``prompt --ctrl_img PATH ... --w N``; None (with problems) when it cannot be."""
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        out.problems.append(f"{where}: expected a mapping with a prompt string, got {item!r}")
        return None
    rules = TABLE["sample.samples[]"]
    problems_before = len(out.problems)
    for key in list(item):
        rule = rules.get(key)
        if rule is None:
            close = difflib.get_close_matches(str(key), list(rules), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(rules)}"
            out.problems.append(f"{where}.{key}: unknown key; {hint}")
        elif not isinstance(rule, Mapped):
            _apply(dict(item), key, rule, {}, f"{where}.{key}", out)  # a copy: the flags below read item
    if len(out.problems) > problems_before:
        return None
    first = item.get("ctrl_img_1") or item.get("ctrl_img")
    controls = [c for c in (first, item.get("ctrl_img_2"), item.get("ctrl_img_3")) if c]
    parts = [item["prompt"].strip()] + [f"--ctrl_img {c}" for c in controls]
    parts += [f"--{flag} {item[key]}" for key, flag in _SAMPLE_FLAGS if item.get(key) is not None]
    return " ".join(parts)


def _prodigy_lr(proc: dict, path: str, out: Translation) -> None:
    """ai-toolkit runs Prodigy at lr 1.0 whenever train.lr is below 0.1; here lr is used as written."""
    train = proc.get("train")
    if not isinstance(train, dict) or train.get("optimizer") != "prodigy":
        return
    lr = train.get("lr")
    try:
        low = lr is not None and float(lr) < 0.1
    except (TypeError, ValueError):
        return
    if low:
        out.problems.append(f"{path}.train.lr: {lr!r} with optimizer prodigy would barely train here (ai-toolkit "
                            "silently uses 1.0 for Prodigy when lr is below 0.1); set lr: 1.0")


def ai_toolkit_help() -> str:
    """The ``--help-config`` section listing every ai-toolkit key by disposition."""
    lines = ["ai-toolkit keys (accepted in configs written for ai-toolkit; our own keys are listed above)"]
    titles = ((Mapped, "mapped to our key"), (NoEffect, "no effect here (dropped, named in one log line)"),
              (Unsupported, "unsupported unless at the value shown (then dropped like no-effect keys)"))
    for kind, title in titles:
        lines.append(f"  {title}:")
        for section, rules in TABLE.items():
            for key, rule in rules.items():
                if isinstance(rule, kind):
                    lines.append(f"    {section}.{key}{_rule_text(section, rule)}")
    lines.append("  depending on other keys:")
    lines.append("    network.lokr_full_rank, network.lokr_factor: no effect with network.type lora (ai-toolkit writes "
                 "them on every network)")
    lines.append("    train.lr below 0.1 with optimizer prodigy: refused (ai-toolkit silently uses 1.0; set lr: 1.0)")
    lines.append("  values of our keys:")
    for vpath, values in VALUES.items():
        for value, rule in values.items():
            if isinstance(rule, Refused):
                lines.append(f"    {vpath}: {value!r} unsupported ({rule.why})")
            else:
                lines.append(f"    {vpath}: {value!r} -> {'(our default)' if rule is DROP else repr(rule)}")
    return "\n".join(lines)


def _rule_text(section: str, rule: Rule) -> str:
    if isinstance(rule, Mapped):
        target = f"datasets[].{rule.target}" if section == "datasets[]" and "." not in rule.target else rule.target
        return f" -> {target}" + (f"  ({rule.why})" if rule.why else "")
    if isinstance(rule, Unsupported):
        off = "empty/null" if callable(rule.off) else " or ".join(repr(v) for v in rule.off)
        return f"  [off: {off}]  ({rule.why})"
    return f"  ({rule.why})"

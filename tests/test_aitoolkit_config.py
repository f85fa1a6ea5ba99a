"""Configs written for ai-toolkit: every key it defines is ours, mapped to ours, dropped with one log line, or refused
by name (toolkit/config/aitoolkit.py); typos stay errors."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.config_helpers import AI_TOOLKIT_CORPUS, DATA, MINIMAL, load, problems_of, with_process
from toolkit.config import config_help, load_job_config
from toolkit.config.aitoolkit import SECTIONS, TABLE
from toolkit.config.aitoolkit_rules import Mapped, Unsupported
from toolkit.config.aitoolkit_values import VALUES
from toolkit.config.aitoolkit_translate import translate_job

UI_JOB = DATA / "aitoolkit" / "ui_flux_kontext_job.yaml"
SUMMARY = "ai-toolkit keys with no effect here"


def _ui_job() -> dict:
    return yaml.safe_load(UI_JOB.read_text(encoding="utf-8"))


def _summary_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith(SUMMARY)]


# ------------------------------------------------------------------------------------------ the corpus


@pytest.mark.parametrize("path", AI_TOOLKIT_CORPUS, ids=[path.name for path in AI_TOOLKIT_CORPUS])
def test_corpus_config_loads(path: Path) -> None:
    process = load_job_config(path, environ={}).config.process[0]
    assert process.type == "sd_trainer" and process.model.arch == "flux_kontext"
    assert process.sample.prompts and all("--ctrl_img " in prompt for prompt in process.sample.prompts)


def test_ui_job_lands_in_our_config() -> None:
    process = load_job_config(UI_JOB, environ={}).config.process[0]
    assert process.log_every == 1 and process.performance_log_every == 10
    assert (process.network.linear, process.network.linear_alpha) == (32, 32.0)
    assert process.network.type == "lora"  # the UI's lokr_full_rank: true / lokr_factor: -1 do nothing on a LoRA
    assert process.save.format == "diffusers" and process.save.dtype == "bf16"
    assert process.train.gradient_accumulation_steps == 1 and process.train.timestep_type == "weighted"
    assert process.train.optimizer_params == {"weight_decay": 0.0001}
    assert process.model.quantize and process.model.quantize_te and process.model.qtype == "qfloat8"
    assert process.datasets[0].resolution == [512, 768, 1024] and process.datasets[0].default_caption == ""
    assert process.sample.prompts == ["make the walls brick red --ctrl_img /path/to/control/folder/room1.jpg",
                                      "put a lamp on the table --ctrl_img /path/to/control/folder/room1.jpg"]


def test_no_effect_keys_make_exactly_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="toolkit.config.loader")
    load_job_config(UI_JOB, environ={})
    (line,) = _summary_lines(caplog)
    for key in ("process[0].sqlite_db_path", "logging.use_ui_logger", "network.conv_alpha", "model.qtype_te",
                "train.switch_boundary_every", "datasets[0].controls", "datasets[0].num_frames", "sample.fps"):
        assert key in line
    caplog.clear()
    load(tmp_path, MINIMAL)
    assert _summary_lines(caplog) == []


# ------------------------------------------------------------------------------------------ mapped keys

# (section values given, where the value lands in our process config, expected value)
MAPPED: list[tuple[str, dict, str, Any]] = [
    ("process.training_seed", {"training_seed": 7}, "train.seed", 7),
    ("logging.log_every", {"logging": {"log_every": 3}}, "log_every", 3),
    ("logging.use_wandb", {"logging": {"use_wandb": True}}, "trackers.use_wandb", True),
    ("logging.project_name", {"logging": {"project_name": "edits"}}, "trackers.project_name", "edits"),
    ("logging.run_name", {"logging": {"run_name": "r1"}}, "trackers.run_name", "r1"),
    ("save.save_format", {"save": {"save_format": "safetensors"}}, "save.format", "diffusers"),
    ("network.rank", {"network": {"rank": 8}}, "network.linear", 8),
    ("network.alpha", {"network": {"alpha": 4}}, "network.linear_alpha", 4.0),
    ("network.pretrained_lora_path", {"network": {"pretrained_lora_path": "/x/start.safetensors"}},
     "network.pretrained_lora", "/x/start.safetensors"),
    ("model.compile", {"model": {"compile": True}}, "train.compile", True),
    ("train.gradient_accumulation", {"train": {"gradient_accumulation": 4}}, "train.gradient_accumulation_steps", 4),
    ("datasets[].caption_type", {"datasets": [{"folder_path": "/t", "control_path": "/c", "caption_type": "caption"}]},
     "datasets.0.caption_ext", "caption"),
    ("datasets[].control_path_1", {"datasets": [{"folder_path": "/t", "control_path_1": "/c1"}]},
     "datasets.0.control_path", "/c1"),
    ("datasets[].control_path_2", {"datasets": [{"folder_path": "/t", "control_path_1": "/c1", "control_path_2": "/c2",
                                                 "control_path_3": None}]},
     "datasets.0.control_path", ["/c1", "/c2"]),
    ("datasets[].control_path_3", {"datasets": [{"folder_path": "/t", "control_path_1": "/c1", "control_path_2": "/c2",
                                                 "control_path_3": "/c3"}]},
     "datasets.0.control_path", ["/c1", "/c2", "/c3"]),
    ("datasets[].full_size_control_images",
     {"datasets": [{"folder_path": "/t", "control_path": "/c", "full_size_control_images": False}]},
     "datasets.0.control_resolution", 512),
    ("datasets[].cache_text_embeddings",
     {"datasets": [{"folder_path": "/t", "control_path": "/c", "cache_text_embeddings": True}]},
     "train.cache_text_embeddings", True),
    ("sample.samples", {"sample": {"samples": [{"prompt": "p", "ctrl_img": "/c.png"}]}}, "sample.prompts",
     ["p --ctrl_img /c.png"]),
]
MAPPED_SAMPLE_ITEM_KEYS = {"prompt", "ctrl_img", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3", "width", "height", "seed",
                           "guidance_scale", "sample_steps"}


def _at(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@pytest.mark.parametrize("key, sections, target, expected", MAPPED, ids=[case[0] for case in MAPPED])
def test_mapped_key_lands_in_our_config(tmp_path: Path, key: str, sections: dict, target: str, expected: Any) -> None:
    process = load(tmp_path, with_process(**sections)).config.process[0]
    assert _at(process, target) == expected


def test_every_mapped_table_entry_has_a_test() -> None:
    mapped = {f"{section}.{key}" for section, rules in TABLE.items() for key, rule in rules.items()
              if isinstance(rule, Mapped)}
    tested = {case[0] for case in MAPPED} | {f"sample.samples[].{key}" for key in MAPPED_SAMPLE_ITEM_KEYS}
    assert mapped == tested


def test_sample_items_become_prompts_with_our_flags(tmp_path: Path) -> None:
    item = {"prompt": " add a hat ", "ctrl_img_1": "/a.png", "ctrl_img_2": "/b.png", "ctrl_img_3": None, "width": 512,
            "height": 768, "seed": 3, "guidance_scale": 2.5, "sample_steps": 8, "neg": "blurry",
            "network_multiplier": 1.0, "num_frames": 1, "fps": 1, "ctrl_idx": 0, "do_cfg_norm": False}
    process = load(tmp_path, with_process(sample={"samples": [item, {"prompt": "p", "ctrl_img": "/c.png"}]}))
    assert process.config.process[0].sample.prompts == [
        "add a hat --ctrl_img /a.png --ctrl_img /b.png --w 512 --h 768 --seed 3 --cfg 2.5 --steps 8",
        "p --ctrl_img /c.png"]


def test_model_kwargs_match_target_res_is_our_model_key(tmp_path: Path) -> None:
    model = load(tmp_path, with_process(model={"model_kwargs": {"match_target_res": True}})).config.process[0].model
    assert model.match_target_res is True
    (problem,) = problems_of(tmp_path, with_process(model={"model_kwargs": {"match_target_res": True, "other": 1}}))
    assert problem.startswith("config.process[0].model.model_kwargs: {'other': 1} is not supported here (")
    (conflict,) = problems_of(tmp_path, with_process(model={"match_target_res": False,
                                                            "model_kwargs": {"match_target_res": True}}))
    assert conflict.startswith("config.process[0].model.model_kwargs.match_target_res: is ai-toolkit's spelling")


def test_alpha_has_no_effect_when_linear_alpha_is_set(tmp_path: Path) -> None:
    network = load(tmp_path, with_process(network={"alpha": 1, "linear_alpha": 8})).config.process[0].network
    assert network.linear_alpha == 8.0


@pytest.mark.parametrize("path, raw, ours", [
    ("type", "diffusion_trainer", "sd_trainer"),
    ("type", "ui_trainer", "sd_trainer"),
    ("train.optimizer", "prodigyopt", "prodigy"),
    ("network.type", "locon", "lora"),
    ("network.dropout", None, 0.0),
    ("sample.neg", False, ""),
])
def test_ai_toolkit_values_of_our_keys(tmp_path: Path, path: str, raw: Any, ours: Any) -> None:
    data = copy.deepcopy(MINIMAL)
    process = data["config"]["process"][0]
    *parents, leaf = path.split(".")
    node = process
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = raw
    if path == "train.optimizer":
        process["train"]["lr"] = 1.0
    assert _at(load(tmp_path, data).config.process[0], path) == ours


def test_lokr_options_are_kept_for_a_lokr(tmp_path: Path) -> None:
    network = {"type": "lokr", "lokr_full_rank": True, "lokr_factor": 4}
    loaded = load(tmp_path, with_process(network=network)).config.process[0].network
    assert loaded.lokr_full_rank is True and loaded.lokr_factor == 4


def _adapter(tmp_path: Path, network: dict):
    from toolkit.adapters.network import make_adapter_config

    loaded = load(tmp_path, with_process(network={"linear": 8, "linear_alpha": 4, **network})).config.process[0]
    return make_adapter_config(loaded.network, ["to_q"])


def test_lokr_pair_reads_as_in_ai_toolkit(tmp_path: Path) -> None:
    """ai-toolkit's NetworkConfig: lokr_full_rank defaults to true and, only with type lokr, sets linear and
    linear_alpha to 9999999999 (both Kronecker factors full, scale 1); lokr_factor goes to LoKr modules only. On a
    LoRA (its web UI writes `type: lora, lokr_full_rank: true, lokr_factor: -1`) the pair changes nothing."""
    from toolkit.adapters.lokr import FULL_RANK

    plain = _adapter(tmp_path, {"type": "lora"})
    ui = _adapter(tmp_path, {"type": "lora", "lokr_full_rank": True, "lokr_factor": 4})
    assert ui.to_dict() == plain.to_dict() and (plain.r, plain.lora_alpha) == (8, 4)
    default = _adapter(tmp_path, {"type": "lokr"})
    assert (default.r, default.alpha, default.decompose_factor) == (FULL_RANK, FULL_RANK, -1)
    low_rank = _adapter(tmp_path, {"type": "lokr", "lokr_full_rank": False, "lokr_factor": 4})
    assert (low_rank.r, low_rank.alpha, low_rank.decompose_factor) == (8, 4, 4)


def test_mapped_key_and_our_key_disagreeing_is_a_problem(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, with_process(train={"gradient_accumulation": 4,
                                                           "gradient_accumulation_steps": 2}))
    assert problem.startswith("config.process[0].train.gradient_accumulation: is ai-toolkit's spelling of "
                              "train.gradient_accumulation_steps")


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("sections, key, value", [
    ({"train": {"min_snr_gamma": 5}}, "train.min_snr_gamma", "5"),
    ({"train": {"loss_type": "stepped"}}, "train.loss_type", "'stepped'"),
    ({"train": {"optimizer": "lion"}}, "train.optimizer", "'lion'"),
    ({"train": {"lr_scheduler": "polynomial"}}, "train.lr_scheduler", "'polynomial'"),
    ({"train": {"timestep_type": "next_sample"}}, "train.timestep_type", "'next_sample'"),
    ({"model": {"qtype": "uint4|ostris/accuracy_recovery_adapters"}}, "model.qtype",
     "'uint4|ostris/accuracy_recovery_adapters'"),
    ({"model": {"quantize": True, "quantize_te": True, "qtype": "qint8", "qtype_te": "qfloat8"}}, "model.qtype_te",
     "'qfloat8'"),
    ({"network": {"network_kwargs": {"ignore_if_contains": ["single"]}}}, "network.network_kwargs",
     "{'ignore_if_contains': ['single']}"),
    ({"sample": {"network_multiplier": 0.5}}, "sample.network_multiplier", "0.5"),
    ({"sample": {"samples": [{"prompt": "p", "ctrl_img": "/c.png", "network_multiplier": 0.8}]}},
     "sample.samples[0].network_multiplier", "0.8"),
    ({"datasets": [{"folder_path": "/t", "control_path": "/c", "random_scale": True}]}, "datasets[0].random_scale",
     "True"),
])
def test_result_changing_value_is_refused_by_name(tmp_path: Path, sections: dict, key: str, value: str) -> None:
    (problem,) = problems_of(tmp_path, with_process(**sections))
    assert problem.startswith(f"config.process[0].{key}: {value} is not supported here (")


def test_all_problems_are_reported_together_before_any_model_loads(tmp_path: Path, capsys, no_model_load) -> None:
    import run
    from tests.config_helpers import write_config

    data = with_process(train={"min_snr_gamma": 5, "noise_offset": 0.1, "learnin_rate": 1e-4},
                        datasets=[{"folder_path": "/t", "control_path": "/c", "inpaint_path": "/m"}])
    assert run.main([str(write_config(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err
    for key in ("train.min_snr_gamma: 5 is not supported here", "train.noise_offset: 0.1 is not supported here",
                "datasets[0].inpaint_path: '/m' is not supported here", "train.learnin_rate: unknown key"):
        assert f"config.process[0].{key}" in err


def test_prodigy_with_a_small_lr_is_refused(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, with_process(train={"optimizer": "prodigyopt", "lr": 1e-4}))
    assert problem.startswith("config.process[0].train.lr: 0.0001 with optimizer prodigy")


def test_unsupported_key_at_its_default_is_dropped_with_the_log_line(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="toolkit.config.loader")
    load(tmp_path, with_process(train={"min_snr_gamma": None, "noise_offset": 0.0}))
    (line,) = _summary_lines(caplog)
    assert "train.min_snr_gamma" in line and "train.noise_offset" in line


# ------------------------------------------------------------------------------------------ typos


@pytest.mark.parametrize("sections, problem", [
    ({"train": {"learnin_rate": 1e-4}}, "config.process[0].train.learnin_rate: unknown key; did you mean 'lr'?"),
    ({"train": {"min_snr_gama": 5}},
     "config.process[0].train.min_snr_gama: unknown key; did you mean 'min_snr_gamma' (an ai-toolkit key)?"),
    ({"logging": {"log_evry": 5}}, "config.process[0].logging.log_evry: unknown key; did you mean 'log_every'?"),
    ({"sample": {"samples": [{"prompt": "p", "ctrl_im": "/c.png"}]}},
     "config.process[0].sample.samples[0].ctrl_im: unknown key; did you mean 'ctrl_img'?"),
])
def test_typo_is_still_an_error_with_a_hint(tmp_path: Path, sections: dict, problem: str) -> None:
    assert problem in problems_of(tmp_path, with_process(**sections))


# ------------------------------------------------------------------------------------------ the table itself


def _keys_txt() -> list[tuple[str, str]]:
    lines = (DATA / "aitoolkit" / "keys.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ", 2)[:2]) for line in lines if line and not line.startswith("#")]


def _our_keys(section: str) -> set[str]:
    cls = SECTIONS.get(section)
    return {field.name for field in dataclasses.fields(cls)} if cls else set()


def test_every_ai_toolkit_key_is_ours_or_in_the_table() -> None:
    keys = _keys_txt()
    assert len(keys) > 300  # the list really holds ai-toolkit's config classes
    missing = [f"{section}.{key}" for section, key in keys
               if key not in _our_keys(section) and key not in TABLE.get(section, {})
               and not (section == "process" and key in TABLE)]  # whole ai-toolkit-only sections (logging)
    assert missing == []


def test_table_and_schema_share_no_key() -> None:
    """Implementing a key means moving it from the table into the schema; both at once would hide the new field."""
    assert [f"{s}.{key}" for s, rules in TABLE.items() for key in rules if key in _our_keys(s)] == []


def test_table_lists_only_ai_toolkit_keys() -> None:
    keys = set(_keys_txt())
    assert [f"{s}.{key}" for s, rules in TABLE.items() for key in rules if (s, key) not in keys] == []


def test_unsupported_keys_say_why() -> None:
    for rules in TABLE.values():
        for rule in rules.values():
            assert rule.why if not isinstance(rule, Mapped) else True
            assert not isinstance(rule, Unsupported) or rule.off
    assert all(path.split(".")[0] in SECTIONS or path.startswith("datasets[]") for path in VALUES)


def test_help_config_shows_the_dispositions() -> None:
    text = config_help()
    section = text[text.index("ai-toolkit keys"):]
    assert "train.gradient_accumulation -> train.gradient_accumulation_steps" in section
    assert "process.sqlite_db_path  (" in section
    assert "train.min_snr_gamma  [off: empty/null]" in section
    assert "train.optimizer: 'prodigyopt' -> 'prodigy'" in section


def test_generate_jobs_are_left_alone() -> None:
    raw = {"job": "generate", "config": {"name": "g", "process": [{"model": {"dtype": "bf16"}}]}}
    assert translate_job(raw).data == raw and translate_job(raw).no_effect == []


def test_translation_does_not_change_its_input() -> None:
    raw = _ui_job()
    before = copy.deepcopy(raw)
    translate_job(raw)
    assert raw == before

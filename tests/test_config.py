"""Unit tests of the strict config loader and schema (toolkit.config)."""

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.config_helpers import AI_TOOLKIT_EXAMPLE, EXAMPLES, MINIMAL, load, problems_of, with_process, write_config
from toolkit.config import ConfigProblems, JobConfig, checks, config_help, load_job_config, schema
from toolkit.errors import ConfigError


# ------------------------------------------------------------------------------------------ loading


def test_ai_toolkit_example_loads_unchanged() -> None:
    job = load_job_config(AI_TOOLKIT_EXAMPLE, environ={})
    process = job.config.process[0]
    assert job.config.name == "my_first_flux_kontext_lora_v1"
    assert process.train.lr == 1e-4 and isinstance(process.train.lr, float)
    assert process.datasets[0].resolution == [512, 768]
    assert process.model.arch == "flux_kontext"
    assert process.model.quantize is True
    assert process.network.linear_alpha == 16.0 and isinstance(process.network.linear_alpha, float)
    assert process.sample.guidance_scale == 4.0
    assert process.train.timestep_type == "weighted"
    assert process.trigger_word is None and process.performance_log_every == 0
    assert job.meta == {"name": "my_first_flux_kontext_lora_v1", "version": "1.0"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_shipped_example_loads(path: Path) -> None:
    job = load_job_config(path)
    assert job.config.process


def test_minimal_config_fills_defaults(tmp_path: Path) -> None:
    process = load(tmp_path, MINIMAL).config.process[0]
    assert process.train == schema.TrainConfig()
    assert process.sample.prompts == [] and process.save.save_every == 250
    assert process.datasets[0].resolution == [512] and process.datasets[0].caption_ext == "txt"


def test_null_section_means_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, with_process(sample=None)).config.process[0].sample == schema.SampleConfig()


def test_json_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(MINIMAL))
    assert load_job_config(path, environ={}).config.name == "run"


# ------------------------------------------------------------------------------------------ key errors


def test_unknown_key_suggests_close_match_with_full_path(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_process(train={"learning_rate": 1e-4}))
    assert problems == ["config.process[0].train.learning_rate: unknown key; did you mean 'lr'?"]


def test_unknown_key_typo_uses_difflib(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_process(train={"batchsize": 2}))
    assert problems == ["config.process[0].train.batchsize: unknown key; did you mean 'batch_size'?"]


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, with_process(network={"zzz": 1}))
    assert problem.startswith("config.process[0].network.zzz: unknown key; valid keys: ")
    assert "linear_alpha" in problem and "did you mean" not in problem


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    data = with_process()
    del data["config"]["process"][0]["model"]["arch"]
    (problem,) = problems_of(tmp_path, data)
    assert problem.startswith("config.process[0].model.arch: missing required key")


def test_all_problems_reported_together(tmp_path: Path) -> None:
    data = with_process(train={"learning_rate": 1, "steps": 0}, save={"push_to_hub": 1}, device="gpu")
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_job_config(path, environ={})
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(str(path))
    assert sorted(line.split(":")[0] for line in lines[1:]) == [
        "config.process[0].device",
        "config.process[0].save.push_to_hub",
        "config.process[0].train.learning_rate",
        "config.process[0].train.steps",
    ]


# ------------------------------------------------------------------------------------------ types


@pytest.mark.parametrize("section, key, value, expected", [
    ("network", "linear", 1.5, "expected a whole number, got 1.5"),
    ("train", "batch_size", True, "expected a whole number, got True"),
    ("train", "steps", "many", "expected a whole number, got 'many'"),
    ("train", "lr", "fast", "expected a finite number, got 'fast'"),
    ("train", "lr", ".inf", "expected a finite number"),
    ("train", "optimizer_params", [1], "expected a mapping"),
    ("sample", "prompts", "a cat", "expected a list"),
    ("sample", "neg", 5, "expected a string, got 5"),
    ("model", "name_or_path", None, "expected a string, got null"),
])
def test_wrong_types_are_rejected(tmp_path: Path, section: str, key: str, value: Any, expected: str) -> None:
    if value == ".inf":
        value = float("inf")
    (problem,) = problems_of(tmp_path, with_process(**{section: {key: value}}))
    assert problem.startswith(f"config.process[0].{section}.{key}: {expected}")


def test_number_in_string_field_is_an_error(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, with_process(trigger_word=1234))
    assert problem.startswith("config.process[0].trigger_word: expected a string, got 1234")


@pytest.mark.parametrize("value", [0, 1, "yes", "no", None])
def test_bool_takes_only_true_or_false(tmp_path: Path, value: Any) -> None:
    (problem,) = problems_of(tmp_path, with_process(save={"push_to_hub": value}))
    assert problem.startswith("config.process[0].save.push_to_hub: expected true or false")


def test_unquoted_yaml_yes_is_not_a_bool(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    path.write_text(path.read_text().replace("device: cpu", "device: cpu\n    train:\n      train_unet: yes"))
    with pytest.raises(ConfigProblems) as caught:
        load_job_config(path, environ={})
    assert caught.value.problems == ["config.process[0].train.train_unet: expected true or false, got 'yes' (string)"]


def test_numbers_are_read_as_declared(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    text = "device: cpu\n    train:\n      lr: 1e-4\n      steps: 3e3\n      max_grad_norm: 2\n      seed: 7.0"
    path.write_text(path.read_text().replace("device: cpu", text))
    train = load_job_config(path, environ={}).config.process[0].train
    assert (train.lr, train.steps, train.max_grad_norm, train.seed) == (1e-4, 3000, 2.0, 7)
    assert isinstance(train.steps, int) and isinstance(train.max_grad_norm, float)


def test_quoted_scientific_lr_string_is_a_float(tmp_path: Path) -> None:
    assert load(tmp_path, with_process(train={"lr": "1e-4"})).config.process[0].train.lr == 1e-4


# ------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "steps", 0, "config.process[0].train.steps: must be > 0, got 0"),
    ("train", "lr", -0.001, "config.process[0].train.lr: must be > 0, got -0.001"),
    ("network", "dropout", 1.0, "config.process[0].network.dropout: must be in [0, 1), got 1.0"),
    ("model", "max_sequence_length", 513, "config.process[0].model.max_sequence_length: must be in [1, 512], got 513"),
    ("sample", "width", 1000, "config.process[0].sample.width: must be a multiple of 16 and >= 16, got 1000"),
    (None, "device", "gpu", "config.process[0].device: must be one of cpu, cuda, cuda:N, mps, auto, got 'gpu'"),
])
def test_value_checks(tmp_path: Path, section: Any, key: str, value: Any, expected: str) -> None:
    sections = {section: {key: value}} if section else {key: value}
    assert problems_of(tmp_path, with_process(**sections)) == [expected]


def test_resolution_must_be_multiple_of_16(tmp_path: Path) -> None:
    data = with_process(datasets=[{"folder_path": "/d", "resolution": [512, 500]}])
    assert problems_of(tmp_path, data) == [
        "config.process[0].datasets[0].resolution[1]: must be a multiple of 16 and >= 64, got 500"]


def test_resolution_bare_int_and_duplicates(tmp_path: Path) -> None:
    job = load(tmp_path, with_process(datasets=[{"folder_path": "/d", "resolution": 768}]))
    assert job.config.process[0].datasets[0].resolution == [768]
    data = with_process(datasets=[{"folder_path": "/d", "resolution": [512, 512]}])
    (problem,) = problems_of(tmp_path, data)
    assert problem.startswith("config.process[0].datasets[0].resolution: must be free of duplicates")


def test_literal_error_lists_options_and_suggests(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, with_process(train={"optimizer": "adamw9bit"}))
    assert problem.startswith("config.process[0].train.optimizer: ")
    assert "'adamw', 'adamw8bit', 'adam', 'adafactor', 'prodigy', 'sgd'" in problem
    assert problem.endswith("did you mean 'adamw8bit'?")


@pytest.mark.parametrize("name", ["a/b", "..", "", "a\\b"])
def test_name_must_be_a_plain_name(tmp_path: Path, name: str) -> None:
    data = copy.deepcopy(MINIMAL)
    data["config"]["name"] = name
    (problem,) = problems_of(tmp_path, data)
    assert problem.startswith("config.name: must be")


def test_caption_ext_dot_and_home_are_normalised(tmp_path: Path) -> None:
    data = with_process(datasets=[{"folder_path": "~/imgs", "caption_ext": ".txt"}])
    dataset = load(tmp_path, data).config.process[0].datasets[0]
    assert dataset.caption_ext == "txt"
    assert dataset.folder_path == os.path.expanduser("~/imgs") and not dataset.folder_path.startswith("~")


# ------------------------------------------------------------------------------------------ substitution


def test_env_substitution_and_default(tmp_path: Path) -> None:
    data = with_process(model={"name_or_path": "${MODEL_DIR}/flux"},
                        datasets=[{"folder_path": "${DATA:-/default/data}"}],
                        save={"push_to_hub": "${PUSH:-false}"}, train={"lr": "${LR}"})
    process = load(tmp_path, data, environ={"MODEL_DIR": "/m", "LR": "2e-4"}).config.process[0]
    assert process.model.name_or_path == "/m/flux"
    assert process.datasets[0].folder_path == "/default/data"
    assert process.save.push_to_hub is False and process.train.lr == 2e-4


def test_missing_env_var_is_an_error_with_its_path(tmp_path: Path) -> None:
    data = with_process(model={"name_or_path": "${NOT_SET_ANYWHERE}/flux"})
    (problem,) = problems_of(tmp_path, data, environ={})
    assert problem.startswith("config.process[0].model.name_or_path: environment variable NOT_SET_ANYWHERE")


def test_name_substitution_uses_override(tmp_path: Path) -> None:
    data = with_process(training_folder="out/[name]")
    data["meta"] = {"name": "[name]", "notes": ["run [name]"]}
    job = load(tmp_path, data, name_override="second")
    assert job.config.name == "second"
    assert job.config.process[0].training_folder == "out/second"
    assert job.meta == {"name": "second", "notes": ["run second"]}


@pytest.mark.parametrize("trigger, expected", [
    ("p3r5on", ["a photo of p3r5on smiling  --ctrl_img c.jpg", "p3r5on", "keep  two  spaces"]),
    (None, ["a photo of smiling  --ctrl_img c.jpg", "", "keep  two  spaces"]),
])
def test_trigger_in_sample_prompts(tmp_path: Path, trigger: Any, expected: list[str]) -> None:
    prompts = ["a photo of [trigger] smiling  --ctrl_img c.jpg", "[trigger]", "keep  two  spaces"]
    data = with_process(trigger_word=trigger, sample={"prompts": prompts})
    assert load(tmp_path, data).config.process[0].sample.prompts == expected


# ------------------------------------------------------------------------------------------ cross-field


@pytest.mark.parametrize("sections, expected", [
    ({"train": {"train_text_encoder": True}},
     ["config.process[0].train.train_text_encoder: training the text encoder is not supported"]),
    ({"train": {"train_unet": False}}, ["config.process[0].train.train_unet: false would train nothing"]),
    ({"save": {"push_to_hub": True}}, ["config.process[0].save.hf_repo_id: required when save.push_to_hub"]),
    ({"datasets": [{"folder_path": "/d"}, {"folder_path": "/d/"}]},
     ["config.process[0].datasets[1].folder_path: '/d/' is already used by datasets[0]"]),
    ({"datasets": [{"folder_path": "/d", "control_path": "/d"}]},
     ["config.process[0].datasets[0].control_path: must differ from folder_path"]),
])
def test_cross_field_checks(tmp_path: Path, sections: dict, expected: list[str]) -> None:
    problems = problems_of(tmp_path, with_process(**sections))
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert problem.startswith(start)


def test_sampler_must_match_noise_scheduler() -> None:
    job = load_job_config(AI_TOOLKIT_EXAMPLE, environ={})
    job.config.process[0].sample.sampler = "other"  # type: ignore[assignment]
    (problem,) = checks.validate_job(job)
    assert problem.startswith("config.process[0].sample.sampler: must equal train.noise_scheduler")


# ------------------------------------------------------------------------------------------ help


def _nested_types(tp: Any) -> list[Any]:
    """``tp`` and every type argument inside it (``list[Union[A, B]]`` -> the list, the union, A, B)."""
    return [tp] + [inner for arg in getattr(tp, "__args__", ()) for inner in _nested_types(arg)]


def _all_sections(cls: type) -> list[type]:
    """``cls`` and every dataclass reachable from its fields."""
    found = [cls]
    for field in dataclasses.fields(cls):
        for candidate in _nested_types(field.type):
            if dataclasses.is_dataclass(candidate) and candidate not in found:
                found += [section for section in _all_sections(candidate) if section not in found]
    return found


def test_config_help_mentions_every_field() -> None:
    text = config_help()
    sections = _all_sections(JobConfig)
    assert len(sections) == 16  # + TrackersConfig
    for section in sections:
        for field in dataclasses.fields(section):
            assert field.metadata["help"], f"{section.__name__}.{field.name} has no help"
            assert f"  {field.name}: " in text
            assert field.metadata["help"] in text

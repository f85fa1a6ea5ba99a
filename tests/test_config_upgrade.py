"""A training state saved by an older trainer lacks the options added since: resuming it with those options at their
declared defaults is no config change; setting one to another value still is."""

from __future__ import annotations

import copy
from pathlib import Path

from tests.helpers import tiny_config_dict
from toolkit.config.loader import load_job_dict
from toolkit.state.config_change import config_diff, field_defaults, with_new_defaults
from toolkit.state.train_state import training_config


def _process(tmp_path: Path, **dataset):
    raw = tiny_config_dict(tmp_path / "out", tmp_path / "model", tmp_path / "data")
    raw["config"]["process"][0]["datasets"][0].update(dataset)
    return load_job_dict(raw, "c.yaml").config.process[0]


def _older(saved: dict) -> dict:
    """The same config as an older trainer saved it: without two options added later."""
    old = copy.deepcopy(saved)
    del old["datasets"][0]["control_dropout_rate"]
    del old["model"]["trim_text_tokens"]
    return old


def test_new_options_at_their_defaults_are_no_change(tmp_path):
    process = _process(tmp_path)
    new = training_config(process)
    old = _older(new)
    assert config_diff(old, new)  # what the check saw before: two "None -> default" changes
    assert config_diff(with_new_defaults(old, new, field_defaults(process)), new) == []


def test_a_new_option_set_to_another_value_is_still_a_change(tmp_path):
    old = _older(training_config(_process(tmp_path)))
    process = _process(tmp_path, control_dropout_rate=0.3)
    new = training_config(process)
    assert config_diff(with_new_defaults(old, new, field_defaults(process)), new) == [
        "datasets[0].control_dropout_rate: None -> 0.3"]


def test_field_defaults_follow_lists_and_nested_sections(tmp_path):
    default_of = field_defaults(_process(tmp_path))
    assert default_of(("datasets", 0, "control_dropout_rate")) == 0.0
    assert default_of(("model", "trim_text_tokens")) is False
    assert default_of(("train", "ema_config", "use_ema")) is False
    assert default_of(("no_such_key",)).__class__.__name__ == "_MISSING_TYPE"

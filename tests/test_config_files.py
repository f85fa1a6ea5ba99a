"""The config loader's file handling: syntax errors with their line, duplicate keys, the top level, how a config
name is found, and the resolved config written back (round trip, no secrets)."""

from pathlib import Path

import pytest
import yaml

from tests.config_helpers import AI_TOOLKIT_EXAMPLE, with_process, write_config
from toolkit.config import find_config_file, load_job_config, read_config_file, write_resolved_config
from toolkit.errors import ConfigError


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("job: extension\nconfig:\n  name: run\n  process: [\n    - bad\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "line 5" in message


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "job": "extension",\n  "config": {,}\n}\n')
    with pytest.raises(ConfigError, match=r"broken\.json: line 3"):
        read_config_file(path)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("job: extension\njob: extension\n")
    with pytest.raises(ConfigError, match=r"line 2.*duplicate key 'job'"):
        read_config_file(path)


@pytest.mark.parametrize("text", ["[1, 2]", "", "just a string"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="top level"):
        read_config_file(path)


def test_find_config_file_resolution_order(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name in ("a.json", "a.yml", "a.yaml", "b.json"):
        (config_dir / name).write_text("{}")
    given = tmp_path / "given.yaml"
    given.write_text("{}")
    assert find_config_file(str(given), config_dir) == given
    assert find_config_file("a.json", config_dir) == config_dir / "a.json"
    assert find_config_file("a", config_dir) == config_dir / "a.yaml"
    (config_dir / "a.yaml").unlink()
    assert find_config_file("a", config_dir) == config_dir / "a.yml"
    assert find_config_file("b", config_dir) == config_dir / "b.json"
    with pytest.raises(ConfigError) as caught:
        find_config_file("missing", config_dir)
    for suffix in ("", ".yaml", ".yml", ".json"):
        assert str(config_dir / f"missing{suffix}") in str(caught.value)


def test_write_resolved_config_round_trip(tmp_path: Path) -> None:
    job = load_job_config(AI_TOOLKIT_EXAMPLE, environ={})
    out = tmp_path / "run" / "config.yaml"
    write_resolved_config(job, out)
    assert load_job_config(out, environ={}) == job
    assert [path.name for path in out.parent.iterdir()] == ["config.yaml"]


def test_written_config_has_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_ENVSECRET0123456789")
    data = with_process(train={"optimizer_params": {"api_key": "plain-secret-value"}})
    data["meta"] = {"hf_token": "hf_METASECRET987654321", "note": "token is ${HF_TOKEN}"}
    job = load_job_config(write_config(tmp_path, data))
    assert job.meta["note"] == "token is hf_ENVSECRET0123456789"
    out = tmp_path / "resolved.yaml"
    write_resolved_config(job, out)
    text = out.read_text()
    for secret in ("hf_ENVSECRET0123456789", "hf_METASECRET987654321", "plain-secret-value"):
        assert secret not in text
    assert yaml.safe_load(text)["meta"] == {"hf_token": "***", "note": "token is ***"}



"""Shared by the config tests: a minimal valid job, and writing / loading it through a file."""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolkit.config import ConfigProblems, JobConfig, load_job_config

DATA = Path(__file__).parent / "data"
AI_TOOLKIT_EXAMPLE = DATA / "aitoolkit" / "flux_kontext_24gb.yaml"
AI_TOOLKIT_CORPUS = sorted((DATA / "aitoolkit").glob("*.yaml"))
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "config" / "examples").glob("*.yaml"))

MINIMAL: dict[str, Any] = {
    "job": "extension",
    "config": {
        "name": "run",
        "process": [{
            "type": "sd_trainer",
            "device": "cpu",
            "datasets": [{"folder_path": "/data/targets", "control_path": "/data/controls"}],
            "model": {"name_or_path": "/models/tiny", "arch": "flux_kontext"},
        }],
    },
}


def write_config(tmp_path: Path, data: dict, name: str = "job.yaml") -> Path:
    """Dump ``data`` as YAML into ``tmp_path/name`` and return the path."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_process(**sections: Any) -> dict:
    """A copy of MINIMAL whose first process has ``sections`` merged in (dicts merge one level deep)."""
    data = copy.deepcopy(MINIMAL)
    process = data["config"]["process"][0]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(process.get(key), dict):
            process[key].update(value)
        else:
            process[key] = value
    return data


def problems_of(tmp_path: Path, data: dict, environ: Any = None) -> list[str]:
    """Load ``data`` and return the reported problems; fails if it loads."""
    with pytest.raises(ConfigProblems) as caught:
        load_job_config(write_config(tmp_path, data), environ={} if environ is None else environ)
    return caught.value.problems


def load(tmp_path: Path, data: dict, **kwargs: Any) -> JobConfig:
    """Load ``data`` through a file."""
    kwargs.setdefault("environ", {})
    return load_job_config(write_config(tmp_path, data), **kwargs)

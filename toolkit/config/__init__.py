"""Typed, strict job config: the dataclasses (``schema``, built from ``fields``), the YAML/JSON loader (``loader``,
with ``convert``), the cross-field checks (``checks``) and ``--help-config`` (``help``).

Typical use::

    from toolkit.config import load_job_config, write_resolved_config
    job = load_job_config("my_run")            # config/my_run.yaml, or a path
    write_resolved_config(job, run_dir / "config.yaml")
"""

from toolkit.config.loader import (
    DEFAULT_CONFIG_DIR,
    ConfigProblems,
    config_help,
    convert,
    find_config_file,
    job_to_dict,
    load_job_config,
    read_config_file,
    write_resolved_config,
)
from toolkit.config.schema import (
    DatasetConfig,
    EMAConfig,
    JobConfig,
    ModelConfig,
    NetworkConfig,
    RootConfig,
    SampleConfig,
    SaveConfig,
    TrainConfig,
    TrainProcessConfig,
)
from toolkit.config.checks import validate_job

__all__ = [
    "DEFAULT_CONFIG_DIR", "ConfigProblems", "DatasetConfig", "EMAConfig", "JobConfig", "ModelConfig",
    "NetworkConfig", "RootConfig", "SampleConfig", "SaveConfig", "TrainConfig", "TrainProcessConfig",
    "config_help", "convert", "find_config_file", "job_to_dict", "load_job_config", "read_config_file",
    "validate_job", "write_resolved_config",
]

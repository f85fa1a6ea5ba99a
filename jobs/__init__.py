"""Jobs: a loaded config becomes a job, which runs its processes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from toolkit.config.loader import find_config_file, load_job_config


def get_job(config: str | Path, name_override: Optional[str] = None, fresh: bool = False, dry_run: bool = False):
    """Find and strictly load a config file, and build its job (no model is loaded here)."""
    from jobs.ExtensionJob import ExtensionJob

    path = find_config_file(str(config))
    return ExtensionJob(load_job_config(path, name_override=name_override), config_file=path, fresh=fresh,
                        dry_run=dry_run)

"""`job: extension`: a named job whose `config.process` entries run one after another."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from jobs.extensions import load_extensions
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
from jobs.process.CaptionProcess import CaptionProcess
from jobs.process.GenerateProcess import GenerateProcess
from toolkit.config.caption_schema import CAPTION_TYPES
from toolkit.config.schema import JobConfig
from toolkit.errors import UserError

log = logging.getLogger(__name__)

PROCESS_TYPES = {"sd_trainer": BaseSDTrainProcess, "generate": GenerateProcess,
                 **{kind: CaptionProcess for kind in CAPTION_TYPES}}


class ExtensionJob:
    def __init__(self, job_config: JobConfig, config_file: Optional[Path] = None, fresh: bool = False,
                 dry_run: bool = False) -> None:
        """`fresh` (run.py --fresh): training processes start over in a new run folder instead of resuming.
        `dry_run` (run.py --dry-run): caption processes print what they would caption; other kinds are refused."""
        others = [p.type for p in job_config.config.process if p.type not in CAPTION_TYPES]
        if dry_run and others:
            raise UserError(f"--dry-run is implemented for caption processes only; this job also has {others}")
        load_extensions()
        self.config = job_config
        self.name = job_config.config.name
        # Building every process first checks every architecture name before anything runs.
        # A training process may name its own run folder (process.name), so stages of one job do not collide.
        self.processes = [PROCESS_TYPES[p.type](p, getattr(p, "name", None) or self.name, job_config, config_file,
                                                index=i, fresh=fresh, **({"dry_run": True} if dry_run else {}))
                          for i, p in enumerate(job_config.config.process)]

    def run(self) -> list[Path]:
        results = []
        for i, process in enumerate(self.processes):
            log.info("job %s: process %d/%d (%s)", self.name, i + 1, len(self.processes), process.cfg.type)
            # A later stage starts from an earlier one's output: model.transformer_path '[process:N]' (toolkit.train.stages).
            results.append(process.run(upstream=list(results)))
        return results

"""`python run.py cache CONFIG [CONFIG ...]`: compute every latent and text-embedding cache entry the training
processes of CONFIG will use, then exit (no transformer is loaded).

The same code fills the caches at the start of training (jobs/process/training_data.fill_caches), so the keys match:
a training run after this pass finds every entry and never loads the VAE or the text encoders (the VAE still loads
at the first sampling round, for the previews). Under `accelerate launch` each rank encodes its share of the disk
entries, as training does. model.vae_device / model.te_device put the encoders on other devices. Only caches on disk
survive the pass: datasets[].cache_latents_to_disk (caption embeddings live beside the latents,
train.cache_text_embeddings); entries that would only live in memory are refused, since the pass would drop them.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from jobs.process import training_data
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
from toolkit.data.cache import FillReport
from toolkit.dist import Runtime
from toolkit.dtypes import compute_dtype
from toolkit.errors import ConfigError
from toolkit.train.validation import ValidationSet

log = logging.getLogger(__name__)


def _check(process: BaseSDTrainProcess) -> None:
    cfg = process.cfg
    memory_only = [i for i, d in enumerate(cfg.datasets) if d.cache_latents and not d.cache_latents_to_disk]
    no_disk = not any(d.cache_latents_to_disk for d in cfg.datasets)
    if memory_only or no_disk:
        where = f"datasets[{memory_only[0]}]" if memory_only else "datasets[]"
        raise ConfigError(f"run.py cache: {where} keeps its cache in memory only (or nothing is cached), so a separate "
                          "cache pass would keep nothing; set datasets[].cache_latents_to_disk: true (and "
                          "train.cache_text_embeddings: true to cache the captions too)")
    if not hasattr(process.arch_cls, "load_encoders"):
        raise ConfigError(f"run.py cache: model.arch {cfg.model.arch} cannot load its encoders alone")


def cache_process(process: BaseSDTrainProcess) -> FillReport:
    """Fill one training process's caches; returns the totals of this rank."""
    _check(process)
    pairs, requests, _ = process.preflight()
    cfg, train = process.cfg, process.train
    rt = Runtime(distributed=train.distributed_training, device=cfg.device, timeout_s=train.ddp_timeout_seconds)
    try:
        validation = ValidationSet.from_datasets(cfg.datasets, cfg.trigger_word, train.seed, train.guidance)
        model = process.arch_cls.load_encoders(process.model_cfg, rt.device, compute_dtype(train.dtype, rt.device))
        datasets = [d for d in training_data.prepare_datasets(pairs, cfg, rt) if d is not None]
        keep = training_data.keep_captions(cfg, datasets, requests, validation)
        reports = training_data.fill_caches(cfg, rt, model, datasets, keep, progress=rt.is_main)
        total = FillReport(**{k: sum(getattr(r, k) for r in reports) for k in vars(FillReport())})
        loaded = getattr(getattr(model, "encoders", None), "loaded", [])
        log.info("cache pass %s: %d entries (this process checked %d: %d reused, %d encoded, %d after the wait); "
                 "encoders loaded: %s", process.name, total.entries, total.reused + total.encoded, total.reused,
                 total.encoded, total.encoded_after_wait, ", ".join(loaded) or "none (everything was cached)")
        return total
    finally:
        rt.end()


def cache_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py cache", description="Compute the latent and caption-embedding caches "
                                "the training processes of CONFIG use (datasets[].cache_latents_to_disk, "
                                "train.cache_text_embeddings), then exit; training then loads no encoder.")
    p.add_argument("config_file_list", nargs="+", metavar="CONFIG", help="training configs (paths or names)")
    args = p.parse_args(argv)
    from jobs import get_job
    from jobs.extensions import load_extensions

    load_extensions()
    for config in args.config_file_list:
        job = get_job(config)
        processes = [proc for proc in job.processes if isinstance(proc, BaseSDTrainProcess)]
        if not processes:
            raise ConfigError(f"{config}: no sd_trainer process to cache for")
        for process in processes:
            cache_process(process)
    return 0


__all__ = ["cache_main", "cache_process"]

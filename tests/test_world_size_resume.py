"""Resuming with another number of processes, any number of times, continues at the true data position: the run
2 processes -> 1 process -> 2 processes sees every item exactly as often as an uninterrupted run (the global item
order does not depend on the process count: toolkit.data.sampler)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO
from tests.launch import SCRIPTS, accelerate_launch, clean_env, ddp_config, explain
from tools.demo_data import build_demo_dataset


@pytest.fixture(scope="module")
def one_bucket(tmp_path_factory) -> Path:
    """6 pairs, all 64 x 64: one bucket, so the item order is the same for a global batch of 1 and of 2."""
    data = build_demo_dataset(tmp_path_factory.mktemp("one_bucket") / "data", num_pairs=6, seed=4)
    for sub in ("target", "control"):
        for path in (data / sub).glob("*.png"):
            Image.open(path).convert("RGB").resize((64, 64)).save(path)
    return data


def _seen(probe_dir: Path) -> list[tuple[int, int]]:
    seen = []
    for probe in sorted(probe_dir.glob("probe_rank*.json")):
        seen += [(mb["epoch"], i) for mb in json.loads(probe.read_text())["micro_batches"] for i in mb["index"]]
    return seen


@pytest.mark.distributed
def test_two_then_one_then_two_processes_see_every_item_once_per_epoch(tmp_path, tiny_model_dir, one_bucket):
    seen: list[tuple[int, int]] = []
    for run, (processes, steps) in enumerate([(2, 2), (1, 6), (2, 8)]):  # items 0-3 | 4-7 | 8-11 of 2 epochs
        config = ddp_config(tmp_path, tiny_model_dir, one_bucket, "ws",
                            **{"train.steps": steps, "train.resume_from": "latest", "sample.prompts": [],
                               "save.save_every": 1000})
        probes = tmp_path / f"probes{run}"
        probes.mkdir()
        env = {"KONTEXT_TEST_PROBE_DIR": str(probes)}
        if processes == 2:
            proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env=env)
        else:
            proc = subprocess.run([sys.executable, str(SCRIPTS / "run_with_probes.py"), str(config)], cwd=REPO,
                                  env=clean_env(**env), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, explain(proc)
        seen += _seen(probes)
    assert len(seen) == 12
    assert Counter(seen) == Counter((epoch, i) for epoch in (0, 1) for i in range(6)), sorted(seen)

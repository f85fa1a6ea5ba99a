"""The caption job under `run_distributed_training.sh CONFIG 2`: each rank captions its share, the main process
writes one report of everything, and only the missing captions are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import write_config
from tests.launch import explain, run_launcher
from tests.test_caption import _job, _pairs, _texts


@pytest.mark.distributed
def test_two_processes_split_the_pairs_and_write_only_the_missing_captions(tmp_path, tiny_vlm_dir):
    colors = {stem: (i * 30, 90, 200 - i * 30) for i, stem in enumerate("abcde")}
    root = _pairs(tmp_path, colors, {"c": "keep C"})
    config = write_config(tmp_path / "cap.yaml", _job(root, tiny_vlm_dir))
    proc = run_launcher(config, 2)
    assert proc.returncode == 0, explain(proc)
    texts = _texts(root / "target")
    assert set(texts) == {f"{stem}.txt" for stem in colors} and texts["c.txt"] == "keep C"
    report = [json.loads(line) for line in (root / "out" / "cap" / "caption_report.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).stem for r in report] == ["a", "b", "d", "e"]
    assert [r["rank"] for r in report] == [0, 1, 0, 1]  # round robin over the sorted pairs still to caption
    assert all(texts[f"{Path(r['image']).stem}.txt"] == r["caption"] for r in report)

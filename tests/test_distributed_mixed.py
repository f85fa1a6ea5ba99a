"""One 2-process gloo run of a config that mixes every kind of data: paired, plain (no control_path), masked, and
regularisation (is_reg). Shards stay disjoint per stream, a global batch never mixes kinds, one process writes.

Each dataset has 6 items in 3 buckets of 2, so with 2 processes x batch 1 every global batch is one bucket's pair and
no item repeats within an epoch: the 18 training items are one epoch of 9 steps, the 6 regularisation items one
regularisation epoch of 3 steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.launch import SCRIPTS, accelerate_launch, ddp_config, explain, read_probes
from tools.demo_data import build_demo_dataset

STEPS = 18  # save_every 4, sample_every 6: every odd step is a reg step -> 9 training + 9 reg steps


def _plain(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for image in (source / "target").glob("*.png"):
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / f"{image.stem}.txt")
    return dest


def _masks(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for image in (source / "target").glob("*.png"):
        size = Image.open(image).size
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, size[0] // 2, size[1]))  # left half counts
        mask.save(dest / image.name)
    return dest


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("mixed")
    paired = build_demo_dataset(root / "paired", num_pairs=6, seed=1)
    masked = build_demo_dataset(root / "masked", num_pairs=6, seed=4)
    plain = _plain(build_demo_dataset(root / "src_plain", num_pairs=6, seed=5), root / "plain")
    reg = _plain(build_demo_dataset(root / "src_reg", num_pairs=6, seed=6), root / "reg")
    common = {"caption_ext": "txt", "caption_dropout_rate": 0.0, "resolution": [64]}
    datasets = [{"folder_path": str(paired / "target"), "control_path": str(paired / "control"), **common},
                {"folder_path": str(plain), **common},
                {"folder_path": str(masked / "target"), "control_path": str(masked / "control"),
                 "mask_path": str(_masks(masked, root / "masks")), **common},
                {"folder_path": str(reg), "is_reg": True, **common}]
    prompts = [f"[trigger] invert --ctrl_img {paired / 'sample_control' / 'sample_000.png'}", "a plain picture"]
    config = ddp_config(root, tiny_model_dir, paired, "mixed", datasets=datasets, **{
        "train.steps": STEPS, "save.save_every": 4, "sample.sample_every": 6, "sample.prompts": prompts})
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_PROBE_DIR": str(root)})
    assert proc.returncode == 0, explain(proc)
    return {"probes": read_probes(root), "run_dir": root / "out" / "mixed", "root": root,
            "folders": {"paired": paired / "target", "plain": plain, "masked": masked / "target", "reg": reg}}


def _kind(path: str, folders: dict[str, Path]) -> str:
    return next(kind for kind, folder in folders.items() if Path(path).parent == folder)


@pytest.mark.distributed
def test_mixed_data_shards_disjointly_per_stream_and_never_mixes_kinds(mixed_run):
    folders = mixed_run["folders"]
    rank0, rank1 = (r["micro_batches"] for r in mixed_run["probes"])
    assert len(rank0) == len(rank1) == STEPS
    epochs: dict[tuple[str, int], list[set]] = {}  # (stream, its epoch) -> what rank 0 and rank 1 trained on
    drawn = {"train": 0, "reg": 0}
    for step, (a, b) in enumerate(zip(rank0, rank1), start=1):
        kinds = {_kind(p, folders) for p in a["path"] + b["path"]}
        assert len(kinds) == 1, f"step {step} mixed {kinds}"  # one bucket, one kind per global batch
        (kind,) = kinds
        assert (kind == "reg") == (step % 2 == 1), f"step {step} drew {kind}"
        assert a["shape"] == b["shape"] and a["mask"] == b["mask"] == (kind == "masked")
        assert a["control"] == b["control"] == (kind in ("paired", "masked"))
        stream = "reg" if kind == "reg" else "train"
        epoch = drawn[stream] // (3 if stream == "reg" else 9)
        drawn[stream] += 1
        seen = epochs.setdefault((stream, epoch), [set(), set()])
        for rank, batch in enumerate((a, b)):
            seen[rank].update(batch["path"])
    assert sorted(epochs) == [("reg", 0), ("reg", 1), ("reg", 2), ("train", 0)]
    train_items = {str(p) for kind, folder in folders.items() if kind != "reg" for p in folder.glob("*.png")}
    reg_items = {str(p) for p in folders["reg"].glob("*.png")}
    for (stream, epoch), (seen0, seen1) in epochs.items():
        assert seen0.isdisjoint(seen1), (stream, epoch)
        assert seen0 | seen1 == (reg_items if stream == "reg" else train_items), (stream, epoch)


@pytest.mark.distributed
def test_mixed_run_has_one_writer_and_samples_with_and_without_control(mixed_run):
    rank0, rank1 = mixed_run["probes"]
    assert rank1["writes"] == [] and rank0["lora_sha256"] == rank1["lora_sha256"]
    assert {"config", "lora:mixed_000000004.safetensors", "samples:6", "samples:18", "lora:mixed.safetensors"} \
        <= set(rank0["writes"])
    assert (rank0["rendered"], rank1["rendered"]) == ([0] * 3, [1] * 3)  # steps 6, 12, 18: one prompt per rank
    samples = mixed_run["run_dir"] / "samples"
    assert {"000000018_00.png", "000000018_01.png", "000000018_sheet.png"} <= {p.name for p in samples.iterdir()}

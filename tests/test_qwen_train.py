"""The shipped Qwen-Image-Edit-Plus example trains through run.py on the tiny model with two control folders, and
its LoRA loads in QwenImageEditPlusPipeline, changes its output and gives the trainer's own sample image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import run
from tests.helpers import REPO, merge, write_config
from tests.test_qwen_math import small_reference_area
from tools.demo_data import build_demo_dataset

EXAMPLE = REPO / "config" / "examples" / "train_lora_qwen_image_edit_plus_tiny.yaml"
NAME = "tiny_qwen_edit_demo"


@pytest.fixture(scope="module")
def multi_data_dir(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "demo_multi", num_pairs=4, num_controls=2)


def example(folder: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    """The shipped example with its model, data and output moved to the test folders."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace('"models/tiny-qwen-image-edit-plus"', f'"{model_dir}"')
    text = text.replace('"data/demo_multi/', f'"{data_dir}/').replace(" data/demo_multi/", f" {data_dir}/")
    cfg = merge(yaml.safe_load(text), {"training_folder": str(folder / "output"), "log_every": 1, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "qwen.yaml", cfg)


def test_example_lora_loads_in_the_pipeline_and_equals_the_trainer_sample(tmp_path, tiny_qwen_dir, multi_data_dir,
                                                                          monkeypatch):
    from diffusers import QwenImageEditPlusPipeline

    from extensions.qwen_image_edit.processor import load_processor

    # The pipeline's own reference size (match_target_res off), made small enough for a CPU on both sides.
    small_reference_area(monkeypatch)
    steps = 4
    config = example(tmp_path, tiny_qwen_dir, multi_data_dir, **{
        "model.match_target_res": False, "train.steps": steps, "train.lr": 1e-2, "save.save_every": 1000,
        "sample.sample_every": steps, "train.skip_first_sample": True})
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "output" / NAME
    final = run_dir / f"{NAME}.safetensors"
    state = load_file(str(final))
    assert state and all(k.startswith("transformer.transformer_blocks.") for k in state)
    assert any(".img_mlp." in k for k in state) and any(".attn.add_q_proj." in k for k in state)

    controls = [Image.open(multi_data_dir / sub / "sample_000.png").convert("RGB")
                for sub in ("sample_control", "sample_control_2")]
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_qwen_dir, processor=load_processor(str(tiny_qwen_dir)),
                                                     dtype=torch.float32)

    def render() -> np.ndarray:
        image = pipe(image=controls, prompt="inv3rt invert the colors", true_cfg_scale=1.0, width=64, height=64,
                     num_inference_steps=4, generator=torch.Generator().manual_seed(42), output_type="np").images[0]
        return image * 255  # 8-bit scale, before rounding

    without = render()
    pipe.load_lora_weights(str(final))
    with_lora = render()
    assert np.abs(with_lora - without).max() > 2, "the LoRA changed nothing"
    # The trainer's sample with the adapter it trained is the pipeline's image with the loaded file, rounded to 8 bit.
    trainer_sample = np.asarray(Image.open(run_dir / "samples" / f"{steps:09d}_00.png").convert("RGB"), dtype=float)
    assert np.abs(trainer_sample - with_lora).max() <= 0.51
    assert np.abs(trainer_sample - without).max() > 2


def test_example_trains_with_match_target_res_and_resumes_bit_identically(tmp_path, tiny_qwen_dir, multi_data_dir,
                                                                          capsys):
    import shutil

    from tests.example_configs import scalars

    config = example(tmp_path, tiny_qwen_dir, multi_data_dir, **{
        "train.steps": 4, "save.save_every": 2, "sample.prompts": []})
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "output" / NAME
    final = run_dir / f"{NAME}.safetensors"
    reference = load_file(str(final))
    losses = scalars(run_dir / "logs", "train/loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(v) for v in losses.values())

    final.unlink()
    shutil.rmtree(run_dir / "state" / "000000004")
    capsys.readouterr()
    assert run.main([str(config)]) == 0
    assert "resuming from" in capsys.readouterr().err
    resumed = load_file(str(final))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.distributed
def test_two_processes_train_and_sample(tmp_path, tiny_qwen_dir, multi_data_dir):
    """The tiny twin through ./run_distributed_training.sh CONFIG 2, with latents and prompts cached to disk: each
    rank encodes its share of the entries, both train on all of them and each renders one sample."""
    from tests.launch import explain, run_launcher

    config = example(tmp_path, tiny_qwen_dir, multi_data_dir, **{
        "train.steps": 2, "train.distributed_training": True, "save.save_every": 1000, "sample.sample_every": 2,
        "train.skip_first_sample": True, "train.cache_text_embeddings": True})
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    prompt = raw["config"]["process"][0]["sample"]["prompts"][0]
    raw["config"]["process"][0]["sample"]["prompts"] = [prompt, prompt + " --seed 9"]  # one prompt per rank
    raw["config"]["process"][0]["datasets"][0].update(cache_latents_to_disk=True, cache_dir=str(tmp_path / "cache"))
    write_config(config, raw)
    proc = run_launcher(config, 2, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, explain(proc)
    run_dir = tmp_path / "output" / NAME
    assert load_file(str(run_dir / f"{NAME}.safetensors"))
    assert sorted(p.name for p in (run_dir / "samples").glob("000000002_0*.png")) == ["000000002_00.png",
                                                                                   "000000002_01.png"]
    kinds = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.safetensors"))
    assert kinds.count("latents") == 4 and kinds.count("text") == 8  # 4 items x (caption, "" of the dropout)


def test_match_target_res_on_an_architecture_without_it_is_an_error(tmp_path, tiny_model_dir, demo_data_dir,
                                                                     no_model_load, capsys):
    from tests.helpers import tiny_config_dict

    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir), {"model.match_target_res": True})
    assert run.main([str(write_config(tmp_path / "kontext.yaml", cfg))]) == 2
    assert "model.match_target_res: flux_kontext always encodes control images" in capsys.readouterr().err


def test_training_lowers_the_loss_on_the_training_pairs(tmp_path, tiny_qwen_dir, multi_data_dir):
    """20 steps of the example: the flow-matching loss on two training pairs (fixed noise and times) falls."""
    from tests.helpers import fixed_inputs
    from tests.qwen_helpers import batch_of, load_qwen
    from toolkit.adapters.lora import add_lora, load_lora_state_dict, make_lora_config
    from toolkit.train import flow_matching

    config = example(tmp_path, tiny_qwen_dir, multi_data_dir, **{
        "train.steps": 20, "train.lr": 1e-2, "save.save_every": 1000, "sample.prompts": []})
    assert run.main([str(config)]) == 0
    names = sorted(p.stem for p in (multi_data_dir / "target").glob("*.png"))[:2]

    def image(sub: str, name: str) -> Image.Image:
        return Image.open(multi_data_dir / sub / f"{name}.png").convert("RGB").resize((64, 64))

    batch = batch_of([image("target", n) for n in names],
                     [[image("control", n), image("control_2", n)] for n in names],
                     [(multi_data_dir / "target" / f"{n}.txt").read_text().strip() for n in names])

    def loss(qwen) -> float:
        inputs, target = fixed_inputs(qwen, batch)
        with torch.no_grad():
            return flow_matching.flow_matching_loss(qwen.denoiser()(**inputs), target, torch.ones(2)).item()

    qwen = load_qwen(tiny_qwen_dir, match_target_res=True)
    before = loss(qwen)
    add_lora(qwen.transformer, make_lora_config(8, 8, qwen.lora_targets()))
    load_lora_state_dict(qwen.transformer, load_file(str(tmp_path / "output" / NAME / f"{NAME}.safetensors")))
    after = loss(qwen)
    assert after < before * 0.9, (before, after)


def test_model_card_names_the_qwen_base_license_and_pipeline():
    import dataclasses

    import extensions.qwen_image_edit  # noqa: F401 (registers the card facts)
    from toolkit.config import load_job_config
    from toolkit.publish.model_card import RunFacts, model_card

    process = load_job_config(EXAMPLE).config.process[0]
    cfg = dataclasses.replace(process, model=dataclasses.replace(process.model,
                                                                 name_or_path="Qwen/Qwen-Image-Edit-2509"))
    card = model_card(cfg, RunFacts(name="x", repo_id="me/x", weight_name="x.safetensors"))
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "Qwen/Qwen-Image-Edit-2509" and meta["license"] == "apache-2.0"
    assert {"qwen-image-edit", "lora", "image-to-image"} <= set(meta["tags"])
    assert 'QwenImageEditPlusPipeline.from_pretrained("Qwen/Qwen-Image-Edit-2509"' in body


def test_gradient_checkpointing_trains_the_same_lora(tmp_path, tiny_qwen_dir, multi_data_dir, monkeypatch):
    """The 24 GB recipe turns it on: recomputing the blocks' activations must not change what is learned."""
    import torch.utils.checkpoint

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    finals, checkpointed = [], []
    for checkpointing in (False, True):
        calls.clear()
        folder = tmp_path / str(checkpointing)
        config = example(folder, tiny_qwen_dir, multi_data_dir, **{
            "train.steps": 2, "train.gradient_checkpointing": checkpointing, "save.save_every": 1000,
            "sample.prompts": []})
        assert run.main([str(config)]) == 0
        finals.append(load_file(str(folder / "output" / NAME / f"{NAME}.safetensors")))
        checkpointed.append(len(calls))
    assert checkpointed[0] == 0 and checkpointed[1] >= 2 * 2  # two blocks, two steps
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=0, atol=1e-6)


def test_validation_loss_with_two_control_folders(tmp_path, tiny_qwen_dir, multi_data_dir):
    from tests.example_configs import scalars

    config = example(tmp_path, tiny_qwen_dir, multi_data_dir, **{
        "train.steps": 2, "save.save_every": 1000, "sample.prompts": [], "sample.sample_every": 3,
        "sample.metric_steps": 1})  # sample_every 3 > steps: measured before training and at the final step only
    import shutil

    val = tmp_path / "val"  # held-out pairs may not be training files: copies of two of them stand in
    for sub in ("target", "control", "control_2"):
        (val / sub).mkdir(parents=True)
        for path in (multi_data_dir / sub).iterdir():
            if path.stem in ("pair_000", "pair_001"):
                shutil.copy(path, val / sub / path.name)
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["config"]["process"][0]["datasets"][0].update(
        val_folder_path=str(val / "target"), val_control_path=[str(val / "control"), str(val / "control_2")])
    write_config(config, raw)
    assert run.main([str(config)]) == 0
    values = scalars(tmp_path / "output" / NAME / "logs", "val/loss")
    assert list(values) == [0, 2] and np.isfinite(values[2]) and values[2] > 0  # the baseline and the final LoRA
    # The edit metrics render the held-out pairs with both control images through the Qwen sampler.
    psnr = scalars(tmp_path / "output" / NAME / "logs", "val/psnr")
    assert list(psnr) == [0, 2] and 0 < psnr[2] < 60


def test_compare_a_run_with_two_control_folders(tmp_path, tiny_qwen_dir, multi_data_dir, capsys):
    """Validation loss during training, then `run.py compare` of the run: a grid of the sample prompt (two
    --ctrl_img) for base and both checkpoints, and the same validation loss for each."""
    import csv

    from tests.example_configs import scalars

    config = example(tmp_path, tiny_qwen_dir, multi_data_dir, **{
        "train.steps": 2, "save.save_every": 1, "sample.sample_every": 2, "train.disable_sampling": True,
        "sample.metric_steps": 1})
    import shutil

    val = tmp_path / "val"  # held-out pairs may not be training files: copies of two of them stand in
    for sub in ("target", "control", "control_2"):
        (val / sub).mkdir(parents=True)
        for path in (multi_data_dir / sub).iterdir():
            if path.stem == "pair_000":  # one held-out pair: compare validates every checkpoint
                shutil.copy(path, val / sub / path.name)
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["config"]["process"][0]["datasets"][0].update(
        val_folder_path=str(val / "target"), val_control_path=[str(val / "control"), str(val / "control_2")])
    write_config(config, raw)
    assert run.main([str(config)]) == 0
    values = scalars(tmp_path / "output" / NAME / "logs", "val/loss")
    assert 2 in values and np.isfinite(values[2])

    out = tmp_path / "cmp"
    capsys.readouterr()
    assert run.main(["compare", str(tmp_path / "output" / NAME), "--out", str(out), "--device", "cpu"]) == 0
    assert "comparing 3 columns" in capsys.readouterr().err  # base + steps 1 and 2
    assert len(list((out / "samples").glob("step_*.png"))) == 3 and (out / "grid.png").is_file()
    with open(out / "metrics.csv", newline="") as f:
        losses = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f)}
    assert sorted(losses) == [0, 1, 2] and losses[2] == pytest.approx(values[2], rel=1e-4)


def test_comfy_format_without_a_known_layout_fails_before_the_model_loads(tmp_path, tiny_qwen_dir, multi_data_dir,
                                                                         monkeypatch, capsys):
    """An architecture that registers no ComfyUI layout (both Qwen archs now do: stand one in) is refused before
    loading."""
    from extensions.qwen_image_edit import QwenImageEditPlus
    from jobs.process import BaseSDTrainProcess as process_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the run should have stopped before that")

    monkeypatch.setattr(QwenImageEditPlus, "load", classmethod(refuse))
    monkeypatch.setattr(process_module, "find_conventions", lambda arch: None)
    config = example(tmp_path, tiny_qwen_dir, multi_data_dir, **{"save.format": "comfy"})
    assert run.main([str(config)]) == 2
    assert "save.format: comfy: no ComfyUI key layout is known for model.arch qwen_image_edit_plus" in \
        capsys.readouterr().err

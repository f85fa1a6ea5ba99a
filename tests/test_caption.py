"""The caption job (`type: pair_captioner`, ai-toolkit's `Qwen3VLCaptioner`): which files it captions, the prompt
and image order the model gets, the cleaning of its answer, and whole runs on a tiny random VL model in one process
(here) and two (test_caption_dist.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import write_config
from toolkit.caption.files import find_items
from toolkit.caption.prompt import build_messages, clean_caption, images_in_order
from toolkit.config.loader import ConfigProblems, load_job_dict
from toolkit.errors import ConfigError


def _pairs(root: Path, colors: dict[str, tuple[int, int, int]], captions: dict[str, str],
           control_folders: int = 1) -> Path:
    """target/<stem>.png (+ captions) and control_k/<stem>.png; control k of a stem has colour (k*40, ...)."""
    (root / "target").mkdir(parents=True)
    for stem, color in colors.items():
        Image.new("RGB", (32, 24), color).save(root / "target" / f"{stem}.png")
        for k in range(control_folders):
            (root / f"control_{k}").mkdir(exist_ok=True)
            Image.new("RGB", (32, 24), (k * 40, 5, 5)).save(root / f"control_{k}" / f"{stem}.png")
    for stem, text in captions.items():
        (root / "target" / f"{stem}.txt").write_text(text, encoding="utf-8")
    return root


def _job(root: Path, model: Path, controls: int = 1, **caption) -> dict:
    return {"job": "extension", "config": {"name": "cap", "process": [{
        "type": "pair_captioner", "training_folder": str(root / "out"),
        "caption": {"model_name_or_path": str(model), "path_to_caption": str(root / "target"),
                    "control_path": [str(root / f"control_{k}") for k in range(controls)],
                    "max_res": 32, "max_new_tokens": 6, "dtype": "fp32", "device": "cpu", **caption}}]}}


def _texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


# -- pure parts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, expected", [
    ("Make the jacket red.", "Make the jacket red."),
    ("Sure, here is the instruction:\nMake the sky purple", "Make the sky purple"),
    ("Instruction: \"Remove the people in the background\"", "Remove the people in the background"),
    ("<think>the colours flip</think>\n\n**Invert   the colors**\nBecause ...", "Invert the colors"),
    ("- 'add a hat'", "add a hat"),
    ("  \n \"\" \n", ""),
])
def test_clean_caption_keeps_one_plain_line(answer, expected):
    assert clean_caption(answer) == expected


def test_clean_caption_puts_the_trigger_word_first_once():
    assert clean_caption("make it red", "[trigger]") == "[trigger] make it red"
    assert clean_caption("[trigger] make it red", "[trigger]") == "[trigger] make it red"
    assert clean_caption("", "[trigger]") == ""


def test_messages_show_controls_then_target_then_the_prompt():
    content = build_messages(2, "PROMPT")[0]["content"]
    kinds = [part["type"] if part["type"] == "image" else part["text"] for part in content]
    assert kinds == ["Input image 1:", "image", "Input image 2:", "image", "Edited image:", "image", "PROMPT"]
    assert images_in_order(["c1", "c2"], "t") == ["c1", "c2", "t"]
    single = [part["type"] for part in build_messages(0, "P")[0]["content"]]
    assert single == ["image", "text"]


def test_find_items_skips_captioned_and_names_a_missing_control(tmp_path):
    root = _pairs(tmp_path, {"a": (1, 1, 1), "b": (2, 2, 2), "c": (3, 3, 3)}, {"a": "done", "b": "  \n"})
    found = find_items(str(root / "target"), [str(root / "control_0")], ["png"], "txt", recaption=False)
    assert [i.image.name for i in found.todo] == ["b.png", "c.png"]  # b's caption file is blank: missing
    assert [p.name for p in found.skipped] == ["a.png"]
    assert found.todo[0].controls == (root / "control_0" / "b.png",)
    assert len(find_items(str(root / "target"), [str(root / "control_0")], ["png"], "txt", True).todo) == 3
    (root / "control_0" / "c.png").unlink()
    with pytest.raises(ConfigError, match=r"c\.png: no control image named 'c\.\*'"):
        find_items(str(root / "target"), [str(root / "control_0")], ["png"], "txt", recaption=False)


def test_single_images_are_found_in_subfolders_but_not_in_controls_or_hidden_ones(tmp_path):
    for sub in ("", "people", "_controls", ".thumbs"):
        (tmp_path / sub).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / sub / f"img{len(sub)}.jpg")
    found = find_items(str(tmp_path), [], ["jpg"], "txt", recaption=False)
    assert sorted(i.image.relative_to(tmp_path).as_posix() for i in found.todo) == ["img0.jpg", "people/img6.jpg"]


# -- config -------------------------------------------------------------------------------------------------------
def test_an_ai_toolkit_caption_job_loads_and_what_would_change_captions_is_refused(tmp_path, caplog):
    process = {"type": "Qwen3VLCaptioner", "sqlite_db_path": "./aitk_db.db", "device": "cuda:1", "caption": {
        "model_name_or_path": "Qwen/Qwen3-VL-8B-Instruct", "dtype": "bf16", "quantize": False, "qtype": "convrot8",
        "low_vram": False, "extensions": ["jpg", "png"], "path_to_caption": str(tmp_path), "recaption": False,
        "compile": True, "caption_extension": "txt", "caption_prompt": "Describe.", "max_res": 512,
        "max_new_tokens": 128, "batch_size": 4, "num_workers": 3, "thinking": False}}
    with caplog.at_level("INFO"):
        job = load_job_dict({"job": "extension", "config": {"name": "c", "process": [process]}}, "ui.yaml")
    caption = job.config.process[0].caption
    assert (caption.device, caption.extensions, caption.max_res) == ("cuda:1", ["jpg", "png"], 512)
    assert "caption.compile" in caplog.text and "caption.batch_size" in caplog.text
    refused = {**process, "caption": {**process["caption"], "thinking": True, "model_name_or_path2": "other/vl",
                                      "quantize": True}}
    with pytest.raises(ConfigProblems) as err:
        load_job_dict({"job": "extension", "config": {"name": "c", "process": [refused]}}, "ui.yaml")
    for key in ("caption.thinking", "caption.model_name_or_path2", "caption.qtype"):
        assert key in str(err.value)


def test_ai_toolkits_other_captioners_are_refused_by_name(tmp_path):
    process = {"type": "Qwen3OmniCaptioner", "caption": {"path_to_caption": str(tmp_path)}}
    with pytest.raises(ConfigProblems) as err:
        load_job_dict({"job": "extension", "config": {"name": "c", "process": [process]}}, "ui.yaml")
    assert str(err.value).count("\n") == 1 and "type: 'Qwen3OmniCaptioner' is not supported here (video" in str(err.value)


def test_quantize_makes_the_language_part_8_bit_and_it_still_answers(tiny_vlm_dir):
    import torch
    from optimum.quanto import QLinear

    from toolkit.caption.vlm import VisionLanguageModel

    vlm = VisionLanguageModel.load(str(tiny_vlm_dir), torch.device("cpu"), torch.float32, quantize="qint8",
                                   low_vram=True)
    quantized = {name for name, module in vlm.model.named_modules() if isinstance(module, QLinear)}
    assert any("language_model" in name for name in quantized)
    assert not any("visual" in name or "lm_head" in name for name in quantized)
    image = Image.new("RGB", (32, 24), (9, 9, 9))
    assert isinstance(vlm.answer(build_messages(0, "Describe."), [image], max_new_tokens=3), str)


def test_a_pair_captioner_without_controls_and_a_typo_are_errors(tmp_path):
    job = _job(tmp_path, tmp_path, controls=0)
    job["config"]["process"][0]["caption"].pop("control_path")
    with pytest.raises(ConfigProblems, match="caption.control_path: type pair_captioner needs"):
        load_job_dict(job, "c.yaml")
    job["config"]["process"][0]["caption"]["recaptoin"] = True
    with pytest.raises(ConfigProblems, match="recaptoin: unknown key; did you mean 'recaption'"):
        load_job_dict(job, "c.yaml")


# -- whole runs on the tiny model ---------------------------------------------------------------------------------
def test_the_job_writes_exactly_the_missing_caption_then_nothing(tmp_path, tiny_vlm_dir):
    import run

    root = _pairs(tmp_path, {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250)}, {"a": "keep A", "c": "keep C"})
    config = write_config(tmp_path / "cap.yaml", _job(root, tiny_vlm_dir, trigger_word="[trigger]"))
    assert run.main([str(config)]) == 0
    texts = _texts(root / "target")
    assert set(texts) == {"a.txt", "b.txt", "c.txt"} and (texts["a.txt"], texts["c.txt"]) == ("keep A", "keep C")
    assert texts["b.txt"].startswith("[trigger] ") and "\n" not in texts["b.txt"]
    report = [json.loads(line) for line in (root / "out" / "cap" / "caption_report.jsonl").read_text().splitlines()]
    assert [(Path(r["image"]).name, r["caption"], r["written"]) for r in report] == [("b.png", texts["b.txt"], True)]
    assert not [p for p in (root / "target").iterdir() if p.name.startswith(".")]  # no temp files left
    before = {p: p.stat().st_mtime_ns for p in (root / "target").glob("*.txt")}
    assert run.main([str(config)]) == 0  # everything captioned: writes nothing
    assert {p: p.stat().st_mtime_ns for p in (root / "target").glob("*.txt")} == before
    assert (root / "out" / "cap" / "caption_report.jsonl").read_text() == ""


def test_dry_run_lists_the_work_and_loads_no_model(tmp_path, monkeypatch, capsys):
    import run
    from toolkit.caption.vlm import VisionLanguageModel

    monkeypatch.setattr(VisionLanguageModel, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    root = _pairs(tmp_path, {"a": (1, 2, 3), "b": (4, 5, 6)}, {"a": "done"})
    assert run.main([str(write_config(tmp_path / "c.yaml", _job(root, tmp_path))), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 pairs to caption, 1 already captioned" in out and "b.png => " in out and "a.png" not in out
    assert not (root / "target" / "b.txt").exists() and not (root / "out").exists()


def test_the_model_sees_the_controls_in_folder_order_then_the_target(tmp_path, tiny_vlm_dir, monkeypatch):
    import run
    from toolkit.caption.vlm import VisionLanguageModel

    seen = []
    answer = VisionLanguageModel.answer

    def spy(self, messages, images, max_new_tokens):
        seen.append(([part["type"] for part in messages[0]["content"]], [img.getpixel((0, 0)) for img in images]))
        return answer(self, messages, images, max_new_tokens)

    monkeypatch.setattr(VisionLanguageModel, "answer", spy)
    root = _pairs(tmp_path, {"x": (7, 200, 9)}, {}, control_folders=2)
    assert run.main([str(write_config(tmp_path / "c.yaml", _job(root, tiny_vlm_dir, controls=2)))]) == 0
    assert seen == [(["text", "image", "text", "image", "text", "image", "text"],
                     [(0, 5, 5), (40, 5, 5), (7, 200, 9)])]


def test_a_failure_keeps_finished_captions_and_a_rerun_does_the_rest(tmp_path, tiny_vlm_dir, monkeypatch):
    import run
    from toolkit.caption.vlm import VisionLanguageModel

    answers = iter(["make it red", RuntimeError("out of memory")])

    def flaky(self, messages, images, max_new_tokens):
        value = next(answers, "make it blue")
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(VisionLanguageModel, "answer", flaky)
    root = _pairs(tmp_path, {"a": (1, 1, 1), "b": (2, 2, 2)}, {})
    config = write_config(tmp_path / "c.yaml", _job(root, tiny_vlm_dir))
    assert run.main([str(config)]) == 1
    assert _texts(root / "target") == {"a.txt": "make it red"}
    assert run.main([str(config)]) == 0
    assert _texts(root / "target") == {"a.txt": "make it red", "b.txt": "make it blue"}


def test_the_tiny_example_config_runs_on_the_demo_data(tmp_path, tiny_vlm_dir, demo_data_dir, monkeypatch):
    import run

    data = tmp_path / "data" / "demo"
    shutil.copytree(demo_data_dir, data)
    (data / "target" / "pair_003.txt").unlink()
    shutil.copytree(tiny_vlm_dir, tmp_path / "models" / "tiny-qwen-vl")
    monkeypatch.chdir(tmp_path)
    config = Path(run.__file__).parent / "config" / "examples" / "caption_pairs_tiny.yaml"
    assert run.main([str(config)]) == 0
    assert (data / "target" / "pair_003.txt").read_text(encoding="utf-8").strip()
    assert len(list((data / "target").glob("*.txt"))) == 8

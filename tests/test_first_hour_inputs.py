"""The first hour of a new user (issue 22), input side: every pre-flight problem at once, training samples shaped and
labelled like generate's, and Hub model ids checked before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

import run
from tests.test_first_hour import _config


# -- item 6: every pre-flight problem at once --------------------------------------------------------------------
def test_every_preflight_problem_is_reported_in_one_run(tmp_path, tiny_model_dir, demo_data_dir, no_model_load,
                                                        capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    (data / "control" / "pair_003.png").unlink()  # a target without its control
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    overrides = {"sample.prompts": [f"x --ctrl_img {data / 'nope.png'}"],  # a bad --ctrl_img
                 "training_folder": str(blocker / "out"),  # an output folder that cannot exist
                 "network.pretrained_lora": str(tmp_path / "missing.safetensors")}
    config = _config(tmp_path, tiny_model_dir, data, **overrides)
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    for expected in ("4 checks failed", "target/pair_003.png: no control image", "nope.png does not exist",
                     "training_folder: cannot write to", "missing.safetensors"):
        assert expected in err, expected
    assert "fix it and run again" in err  # the dataset's one problem, in the singular


def test_the_example_placeholders_report_the_folders_and_the_prompt_control(tmp_path, no_model_load, capsys):
    """config/examples/train_lora_flux_kontext_24gb.yaml as shipped: /path/to placeholders everywhere."""
    from tests.helpers import REPO

    config = REPO / "config" / "examples" / "train_lora_flux_kontext_24gb.yaml"
    text = config.read_text(encoding="utf-8").replace('training_folder: "output"',
                                                      f'training_folder: "{tmp_path / "output"}"')
    copy = tmp_path / "example.yaml"
    copy.write_text(text, encoding="utf-8")
    assert run.main([str(copy)]) == 2
    err = capsys.readouterr().err
    assert "folder does not exist" in err and "--ctrl_img" in err, err[-3000:]
    assert not (tmp_path / "output").exists()  # a failed start leaves no empty run folder


# -- item 8: training samples ------------------------------------------------------------------------------------
def test_training_samples_follow_the_control_shape_and_carry_their_parameters(tmp_path, tiny_model_dir,
                                                                              demo_data_dir):
    from PIL import Image

    from toolkit.render.pngmeta import read_png_params

    portrait = tmp_path / "portrait.png"
    Image.new("RGB", (96, 192), (200, 30, 30)).save(portrait)
    prompts = [f"[trigger] tall --ctrl_img {portrait}", f"[trigger] fixed --ctrl_img {portrait} --w 64 --h 64"]
    overrides = {"train.steps": 2, "save.save_every": 2, "sample.sample_every": 2, "sample.width": 64,
                 "sample.height": 64, "sample.prompts": prompts}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **overrides))]) == 0
    samples = tmp_path / "out" / "tiny" / "samples"
    with Image.open(samples / "000000002_00.png") as tall, Image.open(samples / "000000002_01.png") as fixed:
        assert tall.height > tall.width and tall.size == (32, 80)  # 1:2 within 64x64 px, sides multiples of 16
        assert fixed.size == (64, 64)  # --w/--h win
    params = read_png_params(samples / "000000002_00.png")
    assert params["prompt"] == "inv3rt tall" and params["seed"] == 42 and params["training_step"] == 2
    assert params["lora"].endswith("tiny.safetensors") or params["lora"].endswith("tiny_000000002.safetensors") \
        or "step 2" in params["lora"]
    sheet = read_png_params(samples / "000000002_sheet.png")
    assert sheet["training_step"] == 2
    with Image.open(samples / "000000002_sheet.png") as img:  # a title row (control | tiny, step 2) above 2 rows
        assert img.height == 20 + 2 * (128 + 20)


# -- item 2: a Hub model id without network or token -------------------------------------------------------------
HUB_ID = "black-forest-labs/FLUX.1-Kontext-dev"


def test_an_uncached_hub_model_offline_is_one_line_and_exit_2(tmp_path, tiny_model_dir, demo_data_dir,
                                                               no_model_load, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"model.name_or_path": HUB_ID})
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert f"model.name_or_path: {HUB_ID} is not in the local Hugging Face cache" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "ERROR" in line]) == 1
    assert not (tmp_path / "out").exists()  # no empty run folder


def _fake_cache(root: Path, repo_id: str) -> Path:
    """The layout huggingface_hub's cache uses: refs/main names a snapshot folder that holds the files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}", encoding="utf-8")
    return root


def test_a_cached_hub_model_needs_no_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from toolkit.publish.model_source import hub_model_problem

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_fake_cache(tmp_path / "cache", HUB_ID)))
    assert hub_model_problem(HUB_ID) is None


@pytest.fixture
def fake_hub(monkeypatch):
    """A local HTTP server standing in for the Hub: every request answers `status` with the Hub's error headers."""
    import http.server
    import threading

    from huggingface_hub import constants

    answer = {"status": 401, "code": "GatedRepo"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            self.send_response(answer["status"])
            self.send_header("X-Error-Code", answer["code"])
            self.send_header("X-Error-Message", "Access to model is restricted.")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _reply

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        f"http://127.0.0.1:{server.server_port}" + "/{repo_id}/resolve/{revision}/{filename}")
    yield answer
    server.shutdown()


def test_a_gated_hub_model_without_token_says_accept_the_license_and_set_hf_token(tmp_path, fake_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from toolkit.publish.model_source import hub_model_problem

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    problem = hub_model_problem(HUB_ID, timeout_s=5)
    assert problem is not None and "gated" in problem and "HF_TOKEN" in problem and "\n" not in problem


def test_an_unreachable_hub_is_named(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import constants

    from toolkit.publish.model_source import hub_model_problem

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    problem = hub_model_problem(HUB_ID, timeout_s=5)
    assert problem is not None and "cannot be reached" in problem and "local diffusers folder" in problem

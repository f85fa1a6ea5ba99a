"""train.unload_text_encoder as ai-toolkit trains it: the trigger word (and "") and the sample prompts are encoded,
the text encoders leave, and every training image trains on the trigger word alone."""

from __future__ import annotations

from PIL import Image

from jobs import get_job
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.dist import Runtime


def _setup(tmp_path, model_dir, data_dir, **overrides):
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir),
                {"trigger_word": "inv3rt", "train.unload_text_encoder": True, **overrides})
    process = get_job(write_config(tmp_path / "cfg.yaml", cfg)).processes[0]
    pairs, requests, outputs = process.preflight()
    return process, process.setup(Runtime(distributed=False, device="cpu"), pairs, requests, outputs)


def test_every_image_trains_on_the_trigger_word_with_the_text_encoders_gone(tmp_path, tiny_model_dir,
                                                                             demo_data_dir):
    process, run = _setup(tmp_path, tiny_model_dir, demo_data_dir)
    assert run.model.pipe.text_encoder is None and run.model.pipe.text_encoder_2 is None
    captions = [c for _ in range(3) for c in next(run.batches)["caption"]]
    assert captions and set(captions) == {"inv3rt"}  # the caption files are not read into the batches
    before = {n: p.detach().clone() for n, p in run.model.transformer.named_parameters() if p.requires_grad}
    result = process.optimizer_step(run)  # encodes from the kept embeddings, without the encoders
    assert result.applied and any(not p.equal(before[n]) for n, p in run.model.transformer.named_parameters()
                                  if p.requires_grad)
    request = run.requests[0]  # sample prompts were encoded before the encoders left
    image = run.model.sample([request], [Image.open(request.ctrl_img).convert("RGB").resize((64, 64))])[0]
    assert image.size == (request.width, request.height)


def test_with_cached_text_embeddings_the_captions_are_used(tmp_path, tiny_model_dir, demo_data_dir):
    _, run = _setup(tmp_path, tiny_model_dir, demo_data_dir, **{"train.cache_text_embeddings": True})
    assert run.model.pipe.text_encoder_2 is None
    captions = [c for _ in range(3) for c in next(run.batches)["caption"]]
    assert any(c not in ("inv3rt", "") for c in captions)  # the caption files, trigger word prepended

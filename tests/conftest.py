"""Shared pytest setup: offline hub, bounded CPU threads, and the tiny model / demo data built once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Set before anything imports huggingface_hub, so no test can reach (or wait for) a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tokenizers Rust pool warns (and can deadlock) when a test forks worker processes after tokenizing.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from many threads, and CI runners may report more cores than they really give us.
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format FLUX Kontext folder with random weights (preset "tiny"), built in under a second.

    Shared by the whole session: treat it as read-only and copy it if a test must change files.
    """
    from tools.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux-kontext", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format Qwen-Image-Edit-Plus (2509) folder with random weights, read-only for the session."""
    from tools.tiny_qwen import build_tiny_qwen_pipeline

    return build_tiny_qwen_pipeline(tmp_path_factory.mktemp("models") / "tiny-qwen-image-edit-plus")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen2.5-VL folder with processor and chat template (the caption job's model), read-only."""
    from tools.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-qwen-vl")


@pytest.fixture(scope="session")
def tiny_flux2_dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format FLUX.2 [dev] (Flux2Pipeline) folder with random weights, read-only for the session."""
    from tools.tiny_flux2_dev import build_tiny_flux2_dev_pipeline

    return build_tiny_flux2_dev_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux2-dev", seed=0)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic invert-colors dataset (8 pairs, 3 aspect ratios), read-only for the whole session."""
    from tools.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_pairs=8, seed=0)


@pytest.fixture(autouse=True)
def _restore_logging():
    """run.main installs log handlers on the root logger; drop them after each test so none leaks into the next."""
    yield
    import logging

    logging.getLogger().handlers.clear()


@pytest.fixture
def transformer_calls(monkeypatch):
    """(sequence length, image tokens per position-id frame) of every FLUX transformer forward."""
    from collections import Counter

    from diffusers import FluxTransformer2DModel

    calls: list[tuple[int, Counter]] = []
    original = FluxTransformer2DModel.forward

    def recording(self, hidden_states, *args, img_ids=None, **kwargs):
        calls.append((hidden_states.shape[1], Counter(int(f) for f in img_ids[:, 0].tolist())))
        return original(self, hidden_states, *args, img_ids=img_ids, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", recording)
    return calls


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model (for errors that must come before any model loads)."""
    from extensions.flux_kontext import FluxKontext

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the run should have stopped before that")

    monkeypatch.setattr(FluxKontext, "load", classmethod(refuse))

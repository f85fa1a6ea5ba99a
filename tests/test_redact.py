"""Unit tests of secret redaction (toolkit.redact)."""

import io
import logging

import pytest

from toolkit.redact import (
    RedactingFilter,
    install_log_redaction,
    is_secret_key,
    redact_mapping,
    redact_text,
    secret_values,
)

TOKEN = "hf_abcdefghijklmnop"


def test_secret_values_picks_secret_variables() -> None:
    environ = {
        "HF_TOKEN": TOKEN,
        "WANDB_API_KEY": "wandb-key-123456",
        "MY_SERVICE_PASSWORD": "hunter2hunter2",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
        "GITHUB_TOKEN": "short",
        "TOKENIZERS_PARALLELISM": "false-but-long-enough",
        "HOME": "/home/someone/long",
        "HUGGING_FACE_HUB_TOKEN": "",
    }
    assert sorted(secret_values(environ)) == sorted(
        [TOKEN, "wandb-key-123456", "hunter2hunter2", "aws-secret-value"])


def test_redact_text_replaces_every_occurrence() -> None:
    text = f"token={TOKEN} again {TOKEN}; other=hf_zzzzzzzzzz"
    assert redact_text(text, [TOKEN]) == "token=*** again ***; other=hf_zzzzzzzzzz"


def test_redact_text_defaults_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert redact_text(f"Authorization: Bearer {TOKEN}") == "Authorization: Bearer ***"


@pytest.mark.parametrize("key", ["token", "hf_token", "HF_TOKEN", "api_key", "apikey", "apiKey", "password",
                                 "passwd", "secret", "client-secret", "access_key", "key"])
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["cache_latents_to_disk", "max_step_saves_to_keep", "caption_ext",
                                 "shuffle_tokens", "max_sequence_length", "keyword", "hf_repo_id", "monkey"])
def test_non_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_mapping_hides_secret_keys_and_values() -> None:
    original = {
        "hf_token": "hf_plainvalue123",
        "nested": [{"api_key": 12345678, "caption_ext": "txt"}],
        "cache_latents_to_disk": True,
        "max_step_saves_to_keep": 4,
        "note": f"uses {TOKEN}",
        "password": None,
        "use_token": False,
    }
    redacted = redact_mapping(original, secrets=[TOKEN])
    assert redacted == {
        "hf_token": "***",
        "nested": [{"api_key": "***", "caption_ext": "txt"}],
        "cache_latents_to_disk": True,
        "max_step_saves_to_keep": 4,
        "note": "uses ***",
        "password": None,
        "use_token": False,
    }
    assert original["hf_token"] == "hf_plainvalue123" and original["nested"][0]["api_key"] == 12345678


def _capturing_logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    """A non-propagating logger with one stream handler writing to the returned buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_filter_redacts_formatted_message_and_exception() -> None:
    logger, stream = _capturing_logger("test_redact.filter")
    logger.handlers[0].addFilter(RedactingFilter([TOKEN]))
    logger.info("login with %s for %s", TOKEN, "user")
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        logger.exception("failed")
    output = stream.getvalue()
    assert TOKEN not in output
    assert "INFO login with *** for user" in output
    assert "ValueError: bad token ***" in output


def test_install_log_redaction_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    logger, stream = _capturing_logger("test_redact.install")
    install_log_redaction(logger)
    install_log_redaction(logger)
    assert sum(isinstance(f, RedactingFilter) for f in logger.handlers[0].filters) == 1
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-42424242")
    logger.info("key is wandb-secret-42424242")
    assert stream.getvalue() == "INFO key is ***\n"

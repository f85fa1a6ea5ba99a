"""Secret redaction for logs, the saved resolved config and saved metadata.

Two kinds of secrets are hidden:

- values of environment variables that hold credentials (``secret_values``), wherever they appear in text;
- values stored under keys that name a secret (``token``, ``hf_token``, ``api_key``, ``password``...).

run.py calls ``install_log_redaction()`` once, after it has configured its log handlers: the filter is put on
the handlers present at that moment, so a handler added later must get ``RedactingFilter()`` itself.
"""

import copy
import logging
import os
import re
from typing import Any, Iterable, Mapping, Optional

__all__ = [
    "REDACTED", "SECRET_ENV_VARS", "RedactingFilter", "install_log_redaction", "is_secret_key",
    "redact_mapping", "redact_text", "secret_values",
]

REDACTED = "***"
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY")
MIN_SECRET_LENGTH = 8

# TOKENIZERS_PARALLELISM and friends name tokenizers, not credentials.
_SECRET_ENV_NAME = re.compile(r"TOKEN(?!IZER)|SECRET|PASSWORD|API_KEY")
_SECRET_KEY_WORDS = frozenset({"token", "secret", "password", "passwd", "apikey", "key", "credential",
                               "credentials"})
# Config keys that contain a secret word but hold no secret (ai-toolkit's caption token dropout).
_NOT_SECRET_KEYS = frozenset({"token_dropout_rate"})
_KEY_SPLIT = re.compile(r"[_\-\s.]+|(?<=[a-z0-9])(?=[A-Z])")


def secret_values(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Values of secret-holding environment variables, at least 8 characters long, longest first.

    Secret variables are those in ``SECRET_ENV_VARS`` and any whose name contains TOKEN (not TOKENIZER),
    SECRET, PASSWORD or API_KEY. Short values are skipped: hiding "true" everywhere would wreck the logs.
    """
    found = {value for name, value in environ.items()
             if (name in SECRET_ENV_VARS or _SECRET_ENV_NAME.search(name.upper()))
             and len(value) >= MIN_SECRET_LENGTH}
    return sorted(found, key=lambda value: (-len(value), value))


def redact_text(text: str, secrets: Optional[Iterable[str]] = None) -> str:
    """Replace every occurrence of each secret value in ``text`` with ``***``.

    ``secrets`` defaults to ``secret_values()`` of the current environment.
    """
    values = secret_values() if secrets is None else sorted(secrets, key=len, reverse=True)
    for value in values:
        if value:
            text = text.replace(value, REDACTED)
    return text


def is_secret_key(key: Any) -> bool:
    """True when a mapping key names a secret: one of its words (split on _ - . and camelCase) is
    token, secret, password, passwd, apikey, key or credential(s).

    ``hf_token`` and ``access_key`` are secret; ``shuffle_tokens``, ``max_step_saves_to_keep``,
    ``cache_latents_to_disk`` and ``token_dropout_rate`` are not.
    """
    if not isinstance(key, str) or key in _NOT_SECRET_KEYS:
        return False
    words = [word.lower() for word in _KEY_SPLIT.split(key) if word]
    return any(word in _SECRET_KEY_WORDS for word in words)


def redact_mapping(obj: Any, secrets: Optional[Iterable[str]] = None) -> Any:
    """Deep copy of ``obj`` (nested dicts, lists, tuples) with secrets hidden.

    Values under secret-looking keys (see ``is_secret_key``) become ``***``, except None and booleans,
    which hold nothing secret. Every other string has the secret values (``secrets``, default
    ``secret_values()``) replaced with ``***``.
    """
    values = secret_values() if secrets is None else list(secrets)
    return _redact(obj, values)


def _redact(obj: Any, secrets: list[str]) -> Any:
    """Recursive worker of ``redact_mapping``."""
    if isinstance(obj, Mapping):
        return {key: _redact_item(key, value, secrets) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(item, secrets) for item in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return copy.deepcopy(obj)


def _redact_item(key: Any, value: Any, secrets: list[str]) -> Any:
    """Redact one mapping value, hiding it entirely when its key names a secret."""
    if is_secret_key(key) and value is not None and not isinstance(value, bool):
        return REDACTED
    return _redact(value, secrets)


class RedactingFilter(logging.Filter):
    """Logging filter that hides secret values in the formatted message and in exception text.

    With ``secrets=None`` the environment is read for every record, so tokens set after the filter was
    installed (for example from a .env file) are hidden too.
    """

    def __init__(self, secrets: Optional[Iterable[str]] = None) -> None:
        super().__init__()
        self._secrets = None if secrets is None else list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place with its secrets hidden; never drops a record."""
        secrets = secret_values() if self._secrets is None else self._secrets
        record.msg = redact_text(record.getMessage(), secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, secrets)
        return True


def install_log_redaction(logger: Optional[logging.Logger] = None) -> RedactingFilter:
    """Add one ``RedactingFilter`` to every handler of ``logger`` (default: the root logger).

    Call it after the handlers are configured; handlers that already have a ``RedactingFilter`` are skipped.
    Returns the filter so that handlers added later can get it too.
    """
    logger = logging.getLogger() if logger is None else logger
    redacting = RedactingFilter()
    for handler in logger.handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(redacting)
    if not logger.handlers:
        logging.getLogger(__name__).warning("install_log_redaction: logger %r has no handlers yet; "
                                            "nothing is redacted", logger.name)
    return redacting

"""Is a Hub model id usable before anything loads: in the local cache, or reachable with the access it needs?

One HEAD request with a short timeout on the pipeline's model_index.json answers reachability, existence and gating
(a gated repository answers 401/403 with its error code until the token's account accepted the license). The answer
is a one-line problem that says what to do, or None. No download happens here.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

PROBE_FILE = "model_index.json"  # every diffusers pipeline folder has it
TIMEOUT_S = 10.0
_LOCAL = "or set model.name_or_path to a local diffusers folder"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of whichever HTTP client huggingface_hub uses (httpx, httpx2, requests)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    for name, attribute in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        error = getattr(module, attribute, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def hub_model_problem(repo_id: str, timeout_s: float = TIMEOUT_S) -> Optional[str]:
    """Why the Hub model `repo_id` cannot be loaded from here, in one line naming model.name_or_path; None when it
    is in the local cache or the Hub serves it with this machine's token."""
    from huggingface_hub import constants, get_hf_file_metadata, get_token, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    key = f"model.name_or_path: {repo_id}"
    if isinstance(try_to_load_from_cache(repo_id, PROBE_FILE), str):
        return None
    if _offline():
        return (f"{key} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                f"unset it to download the model once, {_LOCAL}")
    token = get_token()
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, PROBE_FILE), token=token, timeout=timeout_s)
    except GatedRepoError:
        if token is None:
            return (f"{key} is a gated model and no Hugging Face token is set: accept its license at "
                    f"https://huggingface.co/{repo_id}, then put HF_TOKEN=hf_... in .env next to run.py, {_LOCAL}")
        return (f"{key} is a gated model and this token's account has not accepted its license: accept it at "
                f"https://huggingface.co/{repo_id} (signed in as the token's owner), {_LOCAL}")
    except RepositoryNotFoundError:
        hint = "set HF_TOKEN in .env if it is private" if token is None else "check that this token can see it"
        return f"{key} is not on the Hub ({constants.ENDPOINT}): check the id ({hint}), {_LOCAL}"
    except EntryNotFoundError:
        return f"{key} has no {PROBE_FILE}: not a diffusers pipeline repository; {_LOCAL}"
    except _network_errors() as exc:
        return (f"{key} is not in the local cache and the Hub ({constants.ENDPOINT}) cannot be reached "
                f"({type(exc).__name__}: {exc}): check the network (or HF_ENDPOINT), {_LOCAL}")
    return None


__all__ = ["PROBE_FILE", "TIMEOUT_S", "hub_model_problem"]

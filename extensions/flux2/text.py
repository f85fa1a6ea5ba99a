"""Prompt embeddings of a FLUX.2 pipeline (Qwen3 for [klein], Mistral 3 for [dev]) through a bounded cache that
survives unloading the text encoder: captions asked for before the unload stay encodable for good."""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from typing import Any, Sequence

import torch

from toolkit.data.cache import Encoder, make_key, module_fingerprint

log = logging.getLogger(__name__)

CACHE_ENTRIES = 128  # in-memory caption embeddings
ENCODE_BATCH = 16


class PromptEncoder:
    def __init__(self, pipe: Any, device: torch.device, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.device = device
        self.max_sequence_length = max_sequence_length
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pinned: dict[str, torch.Tensor] = {}  # encoded before the text encoder was unloaded

    @torch.no_grad()
    def run(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) embeddings straight from the pipeline's encode_prompt (its static Qwen3 / Mistral method)."""
        embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return embeds

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, L, D) for `captions`; each distinct caption is encoded once (bounded LRU)."""
        missing = sorted({c for c in captions if c not in self._cache and c not in self._pinned})
        if missing:
            if self.pipe.text_encoder is None:
                raise RuntimeError(f"the text encoder was unloaded (train.cache_text_embeddings or "
                                   f"train.unload_text_encoder), but caption {missing[0]!r} was not encoded before")
            for caption, row in zip(missing, self.run(missing)):
                self._cache[caption] = row
        for caption in captions:
            if caption in self._cache:
                self._cache.move_to_end(caption)
        rows = [self._pinned[c] if c in self._pinned else self._cache[c] for c in captions]
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return torch.stack(rows)

    def encoder(self) -> Encoder:
        """caption -> {"prompt_embeds": (L, D)} for toolkit.data.cache, keyed by the text encoder and tokenizer."""
        pipe = self.pipe
        if pipe.text_encoder is None:
            raise RuntimeError("the text encoder is unloaded")
        module = pipe.text_encoder
        config = {k: v for k, v in module.config.to_dict().items()
                  if not k.startswith("_") and k != "transformers_version"}
        tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # [dev]: a processor around it
        parts = {"max_sequence_length": self.max_sequence_length, "pipeline": type(pipe).__name__,
                 "text_encoder": {"config": config, "weights": module_fingerprint(module), "dtype": str(module.dtype)},
                 "tokenizer": make_key("tokenizer", {"json": tokenizer.backend_tokenizer.to_str(),
                                                     "template": str(getattr(tokenizer, "chat_template", ""))})}
        return Encoder(make_key("text", parts), self._encode_list)

    def _encode_list(self, captions: list[str]) -> list[dict]:
        return [{"prompt_embeds": e} for e in self.run(captions)]

    def unload(self, keep: Sequence[str]) -> None:
        """Encode `keep` (sample prompts, validation captions) for good, then free the text encoder."""
        if self.pipe.text_encoder is None:
            return
        keep = sorted(set(keep) - set(self._pinned))
        for start in range(0, len(keep), ENCODE_BATCH):
            chunk = keep[start:start + ENCODE_BATCH]
            self._pinned.update(zip(chunk, self.run(chunk)))
        self._cache.clear()
        self.pipe.text_encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("text encoder unloaded; %d prompts kept encoded", len(self._pinned))

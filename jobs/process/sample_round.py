"""One round of training samples on this rank: image by image, with a progress line and an ETA per image, and a
stop signal honoured between images and between denoising steps.

Rendering a round can take minutes on a slow device (11.5 minutes of silence before the first step was reported);
the first image's time estimates the round, and a long first round says how to skip it."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

from toolkit.render.sampling import SampleRequest, load_controls
from toolkit.train.ema import ema_weights

log = logging.getLogger(__name__)

LONG_FIRST_ROUND_S = 120.0  # a before-training round estimated longer than this gets a hint to skip it


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render_round(model, requests: Sequence[SampleRequest], step: int, ema=None,
                 stop: Optional[Callable[[], bool]] = None, total: Optional[int] = None) -> list[tuple[int, object]]:
    """(request index, image) for each of `requests` (this rank's share of `total` prompts), in order; fewer when
    `stop()` became true (an unfinished image is dropped)."""
    stop = stop or (lambda: False)
    rendered, started = [], time.perf_counter()
    for done, request in enumerate(requests, start=1):
        if stop():
            break
        with ema_weights(ema):
            image = model.sample([request], [load_controls(request)], stop=stop)[0]
        if stop():
            break
        rendered.append((request.index, image))
        each = (time.perf_counter() - started) / done
        left = each * (len(requests) - done)
        log.info("samples of step %d: %d/%d done (%.1f s per image%s)", step, done, len(requests), each,
                 f", about {_duration(left)} left" if left else "")
        if done == 1 and step == 0 and left + each > LONG_FIRST_ROUND_S:
            log.warning("the samples before training take about %s on this device (%d prompts%s); set "
                        "train.skip_first_sample: true to start training at once", _duration(each * len(requests)),
                        total or len(requests), "" if total in (None, len(requests)) else " over all processes")
    return rendered


__all__ = ["LONG_FIRST_ROUND_S", "render_round"]

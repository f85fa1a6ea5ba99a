"""Training telemetry on the main process: TensorBoard scalars, the progress bar, step timing."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Optional, Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


BAR_LOSS_EVERY_S = 1.0  # the bar's loss is this step's, read from the device at most this often (a host sync)


class TqdmLogHandler(logging.StreamHandler):
    """Log records printed above the progress bar (tqdm.write clears and redraws it), not glued onto its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own contract: a failing handler reports and never raises
            self.handleError(record)


class TrainingMonitor:
    """Writes scalars and drives the progress bar; a silent no-op on non-main ranks."""

    def __init__(self, log_dir: Optional[Path], total_steps: int, start_step: int, enabled: bool,
                 trackers: Sequence = ()) -> None:
        self.enabled = enabled
        self.trackers = list(trackers)  # started accelerate trackers (toolkit.train.trackers): the same scalars
        self.writer = None
        self.bar = None
        self._bar_loss_at = 0.0
        # No TensorBoard file yet: this is the run folder's first run (the lr plan is written once per folder).
        self.first_in_folder = enabled and not any(Path(log_dir).glob("events.out.tfevents.*"))
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(log_dir))
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.perf_counter()
        self._window_start = self._t0
        self._window_steps = 0

    def step_done(self, loss=None) -> None:
        """One optimizer step; `loss` (a device tensor) shows in the bar, fresh, at most every BAR_LOSS_EVERY_S."""
        self._window_steps += 1
        if self.bar is None:
            return
        now = time.perf_counter()
        if loss is not None and now - self._bar_loss_at >= BAR_LOSS_EVERY_S:
            self._bar_loss_at = now
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        self.bar.update(1)

    @contextmanager
    def paused(self):
        """Time spent inside (sampling, validation) is not step time: neither the bar's rate and ETA nor
        window()'s seconds per step count it."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - started
            if self.bar is not None:
                self.bar.unpause()

    def window(self) -> tuple[float, int]:
        """Seconds per step over the steps since the last call, and how many steps that was."""
        now = time.perf_counter()
        steps = max(1, self._window_steps)
        seconds = (now - self._window_start) / steps
        self._window_start, self._window_steps = now, 0
        return seconds, steps

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log({key: float(value) for key, value in values.items()}, step=step)
        if self.bar is not None and "train/loss" in values:
            self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values.get('train/lr', 0):.2e}")

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

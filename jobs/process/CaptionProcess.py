"""Caption processes: `type: pair_captioner` writes the edit instruction of every pair without a caption, ai-toolkit's
`type: Qwen3VLCaptioner` / `captioner` a description of every image without one.

Every rank of a multi-process launch captions its share of the items (round robin over the sorted list) with its own
copy of the model; the main process gathers what each wrote into `<training_folder>/<name>/caption_report.jsonl`
and logs a summary. Each caption file is written atomically as soon as its caption exists, so a stopped run loses at
most the caption being written, and running again captions only what is still missing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from toolkit.caption.files import CaptionItem, Found, find_items
from toolkit.caption.prompt import build_messages, clean_caption, images_in_order
from toolkit.caption.vlm import VisionLanguageModel, load_image
from toolkit.config.caption_schema import (DEFAULT_PAIR_PROMPT, DEFAULT_SINGLE_PROMPT, PAIR_TYPES,
                                           CaptionProcessConfig, control_folders)
from toolkit.config.schema import JobConfig
from toolkit.dist import Runtime, launched_world_size
from toolkit.dtypes import compute_dtype
from toolkit.state.atomic import atomic_write_text

log = logging.getLogger(__name__)

REPORT_NAME = "caption_report.jsonl"


@dataclass(frozen=True)
class Written:
    """One caption this run wrote (or could not write: empty model answer)."""

    image: str
    controls: tuple[str, ...]
    caption_file: str
    caption: str
    rank: int

    def as_json(self) -> str:
        return json.dumps({"image": self.image, "controls": list(self.controls), "caption_file": self.caption_file,
                           "caption": self.caption, "written": bool(self.caption), "rank": self.rank})


class CaptionProcess:
    """Find what needs a caption, caption this rank's share, report."""

    def __init__(self, cfg: CaptionProcessConfig, name: str, job_config: JobConfig,
                 config_file: Optional[Path] = None, index: int = 0, fresh: bool = False,
                 dry_run: bool = False) -> None:
        self.cfg = cfg
        self.name = name
        self.index = index
        self.dry_run = dry_run
        self.pairs = cfg.type in PAIR_TYPES
        caption = cfg.caption
        self.prompt = caption.caption_prompt or (DEFAULT_PAIR_PROMPT if self.pairs else DEFAULT_SINGLE_PROMPT)

    @property
    def report_path(self) -> Path:
        return Path(self.cfg.training_folder) / self.name / REPORT_NAME

    def find(self) -> Found:
        caption = self.cfg.caption
        return find_items(caption.path_to_caption, control_folders(caption) if self.pairs else [],
                          caption.extensions, caption.caption_extension, caption.recaption,
                          key=f"config.process[{self.index}].caption")

    def run(self, upstream: Sequence[Optional[Path]] = ()) -> Optional[Path]:
        found = self.find()  # bad folders or unmatched pairs fail here, before any model loads
        if self.dry_run:
            self._print_plan(found)
            return None
        runtime = Runtime(distributed=launched_world_size() > 1, device=self.cfg.caption.device)
        try:
            mine = [found.todo[i] for i in runtime.my_share(len(found.todo))]
            written = self._caption(mine, runtime) if mine else []
            everything = runtime.gather([w.as_json() for w in written])
            if runtime.is_main:
                self._report(found, [json.loads(line) for line in everything])
            runtime.wait()
        finally:
            runtime.end()
        return self.report_path

    def _print_plan(self, found: Found) -> None:
        what = "pairs" if self.pairs else "images"
        print(f"{len(found.todo)} {what} to caption, {len(found.skipped)} already captioned (skipped):")
        for item in found.todo:
            controls = " + ".join(str(c) for c in item.controls)
            print(f"  {controls + ' -> ' if controls else ''}{item.image} => {item.caption_file}")

    def _caption(self, items: Sequence[CaptionItem], runtime: Runtime) -> list[Written]:
        caption = self.cfg.caption
        device = runtime.device
        started = time.perf_counter()
        vlm = VisionLanguageModel.load(caption.model_name_or_path, device,
                                       compute_dtype(caption.dtype, device, key="caption.dtype"),
                                       quantize=caption.qtype if caption.quantize else None,
                                       low_vram=caption.low_vram)
        log.info("caption model %s loaded in %.1f s", caption.model_name_or_path, time.perf_counter() - started)
        messages = build_messages(len(items[0].controls), self.prompt)
        written = []
        for item in tqdm(items, desc="caption", unit="file", disable=not runtime.is_main, dynamic_ncols=True):
            images = images_in_order([load_image(c, caption.max_res) for c in item.controls],
                                     load_image(item.image, caption.max_res))
            text = clean_caption(vlm.answer(messages, images, caption.max_new_tokens), caption.trigger_word)
            if text:
                atomic_write_text(item.caption_file, text)
            else:
                log.warning("%s: the model's answer had no text; no caption written", item.image)
            written.append(Written(str(item.image), tuple(str(c) for c in item.controls), str(item.caption_file),
                                   text, runtime.rank))
        return written

    def _report(self, found: Found, records: list[dict]) -> None:
        records.sort(key=lambda r: r["image"])
        atomic_write_text(self.report_path, "".join(json.dumps(r) + "\n" for r in records))
        done = sum(r["written"] for r in records)
        log.info("captioned %d of %d %s (%d already had a caption, %d empty answers); report: %s", done,
                 len(found.todo), "pairs" if self.pairs else "images", len(found.skipped), len(records) - done,
                 self.report_path)

"""tools.gpu_check: its --smoke run (the same code as on a GPU, tiny model on the CPU) and how it reports rows."""

from __future__ import annotations

import json

import torch

from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
from tools import gpu_check
from tools.gpu_check_row import RowSpec


def test_smoke_writes_rows_and_an_oom_is_a_row(tiny_model_dir, tmp_path, monkeypatch):
    real_step = BaseSDTrainProcess.optimizer_step

    def step_oom_without_checkpointing(self, run):
        if not self.train.gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(self, run)

    monkeypatch.setattr(BaseSDTrainProcess, "optimizer_step", step_oom_without_checkpointing)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--in-process", "--model-dir", str(tiny_model_dir), "--workdir",
                           str(tmp_path / "work"), "--out", str(out), "--quantize", "none",
                           "--checkpointing", "off,on", "--warmup", "0"]) == 0
    result = json.loads(out.read_text())
    oom, ok = result["rows"]
    assert (oom["id"], oom["status"]) == ("64px-none-gc_off-compile_off-p1", "oom")
    assert "out of memory" in oom["error"] and "s_per_step" not in oom
    assert (ok["id"], ok["status"], ok["measured_steps"]) == ("64px-none-gc_on-compile_off-p1", "ok", 2)
    assert ok["s_per_step"] > 0 and ok["samples_per_s"] == 1 / ok["s_per_step"]
    # 64 px: 4 x 4 target + 4 x 4 control tokens after packing, plus 32 T5 tokens
    assert ok["tokens_per_sample"] == 16 + 16 + 32
    assert ok["flops_per_step"] > 0 and ok["trainable_params"] > 0 and ok["planned_mib"] == "-"
    assert ok["loss_mean"] == ok["loss_mean"]  # finite
    assert result["transformer_config"]["num_layers"] == 1  # the tiny folder's transformer, rebuilt at random


def test_matrix_order_budget_and_scaling():
    rows = gpu_check.matrix([512, 1024], ["none", "qint8"], [False, True], [False, True], processes=2)
    assert len(rows) == 32 and rows[0] == RowSpec(512, "none", False, False, 1)
    assert not any(r.compile for r in rows[:16]) and rows[1].processes == 2
    throughput = {1: 2.0, 2: 3.0}
    results = gpu_check.run_matrix(rows[:3], None, budget_s=1e9, runner=lambda spec, left: {
        "id": spec.id, "status": "ok", "samples_per_s": throughput[spec.processes]})
    assert results[1]["scaling_efficiency"] == 3.0 / (2 * 2.0) and "scaling_efficiency" not in results[0]
    skipped = gpu_check.run_matrix(rows[:2], None, budget_s=0.0, runner=None)
    assert [r["status"] for r in skipped] == ["skipped", "skipped"]

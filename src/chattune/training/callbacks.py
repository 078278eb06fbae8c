"""Trainer callbacks that write what a run leaves behind: OUTPUT/metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from chattune.outputs import METRICS_FILE


class MetricsLogger(TrainerCallback):
    """Appends every training log and evaluation to OUTPUT/metrics.jsonl, one JSON object a line."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_FILE
        self._last_time = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen or 0

    def _write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
            elapsed = now - (self._last_time or now)
            record = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                      "tokens_per_second": round((tokens - self._last_tokens) / elapsed, 1) if elapsed > 0 else None,
                      "epoch": logs.get("epoch"), "grad_norm": logs.get("grad_norm"), "tokens_seen": tokens}
            self._last_time, self._last_tokens = now, tokens
            self._write(record)
        elif "eval_loss" in logs:
            record = {"step": state.global_step, **{k: v for k, v in logs.items() if k.startswith("eval_")}}
            self._write(record)
        elif "train_runtime" in logs:
            self._write({"step": state.global_step, **logs})

"""Trainer callbacks that write what a run leaves behind: OUTPUT/metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from chattune.outputs import METRICS_FILE


class MetricsLogger(TrainerCallback):
    """Appends every training log and evaluation to OUTPUT/metrics.jsonl, one JSON object a line
    (tokens_per_second comes with the log: tracking.ThroughputLog adds it for every tracker)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_FILE

    def _write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            record = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                      "tokens_per_second": logs.get("tokens_per_second"), "epoch": logs.get("epoch"),
                      "grad_norm": logs.get("grad_norm"), "tokens_seen": state.num_input_tokens_seen or 0,
                      # a trainer's own metrics: TRL's DPO logs rewards/chosen, rewards/margins, logps/rejected ...
                      **{k: v for k, v in logs.items() if "/" in k}}
            self._write(record)
        elif "eval_loss" in logs:
            record = {"step": state.global_step, **{k: v for k, v in logs.items() if k.startswith("eval_")}}
            self._write(record)
        elif "train_runtime" in logs:
            self._write({"step": state.global_step, **logs})

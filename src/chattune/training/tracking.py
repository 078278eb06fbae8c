"""Experiment tracking through transformers' own integrations (TensorBoard, Weights & Biases, MLflow, Trackio).

chattune only chooses them (`--report-to`), names the run and checks the package is installed before any
data or weights load; each tracker then reads its own environment variables (WANDB_MODE, WANDB_PROJECT,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, TENSORBOARD_LOGGING_DIR ...). Every value the Trainer logs
reaches them: the training loss, learning rate, gradient norm, chattune's tokens per second (ThroughputLog)
and every evaluation metric (eval_loss, eval_perplexity, eval_accuracy, eval_tokens, and whatever another
trainer adds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from pathlib import Path

from chattune.config.schema import report_to_list
from chattune.errors import ChattuneError

# --report-to name (config.TRACKERS) -> (modules transformers' integration can use, the package to install)
PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "trackio": (("trackio",), "trackio"),
}


def check_installed(value: str | None) -> None:
    """Stop in a second, before data or weights load, when a chosen tracker's package is missing."""
    missing = [n for n in report_to_list(value)
               if not any(importlib.util.find_spec(module) for module in PACKAGES[n][0])]
    if missing:
        packages = " ".join(PACKAGES[n][1] for n in missing)
        raise ChattuneError(f"--report-to {','.join(missing)} needs {packages} installed: pip install {packages} "
                            "(or drop it from --report-to)")


def run_name(cfg) -> str:
    """The name trackers show for the run: --run-name, else the output directory's name."""
    return cfg.train.run_name or Path(cfg.train.output_dir).resolve().name


@contextlib.contextmanager
def trackers_paused(trainer):
    """For the evaluation chattune runs after training (for results.json): the trackers have closed their runs
    by then (MLflow would open a stray new one) and already hold that evaluation, logged at its step."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    kinds = tuple(INTEGRATION_TO_CALLBACK.values())
    paused = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kinds)]
    for cb in paused:
        trainer.callback_handler.remove_callback(cb)
    try:
        yield
    finally:
        for cb in paused:
            trainer.callback_handler.add_callback(cb)


class ThroughputLog:
    """Trainer mixin: each training log carries `tokens_per_second`, the non-padding input tokens per second
    since the previous log (the Trainer's own `train_tokens_per_second` averages over the whole run). Added in
    Trainer.log, so metrics.jsonl and every tracker receive the same value."""

    _throughput_mark: tuple[float, int] | None = None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and start_time is not None and self.args.include_num_input_tokens_seen != "no":
            now, tokens = time.time(), int(self.state.num_input_tokens_seen or 0)
            mark = self._throughput_mark
            if mark is None or mark[0] < start_time:  # the first log of this train() call (or of a resumed run)
                mark = (start_time, int(getattr(self, "_initial_num_input_tokens_seen", 0) or 0))
            if now > mark[0]:
                logs["tokens_per_second"] = round((tokens - mark[1]) / (now - mark[0]), 1)
            self._throughput_mark = (now, tokens)
        super().log(logs, start_time)

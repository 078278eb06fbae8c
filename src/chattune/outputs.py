"""Names every layer shares: the files of a run directory, and the label value that carries no loss.

A run directory (`--output-dir`) is a complete model directory that transformers loads, plus what
chattune adds next to the weights; each name is defined here once so that writers and readers agree.
"""

from __future__ import annotations

# the label of a token that carries no loss (PyTorch's cross-entropy ignore_index, transformers' convention)
IGNORE_INDEX = -100

# ---- files chattune writes into a run directory ------------------------------------------------
CONFIG_FILE = "chattune.yaml"  # the resolved run configuration (never any secret)
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step and per evaluation
RESULTS_FILE = "results.json"  # final metrics, data statistics, device and precision
LOG_FILE = "train.log"  # the run's own log
REPORT_FILE = "report.md"  # the run report, with PLOTS_DIR/*.png
PLOTS_DIR = "plots"
REJECTED_FILE = "rejected.jsonl"  # rows skipped with --skip-invalid, each with its reason
MERGED_DIR = "merged"  # a LoRA run's standalone merged model (--merge)
MERGED_FROM_FILE = "merged_from.json"  # what a merged model was merged from
TASK_SCORE_FILE = "eval.json"  # the quickstart's task score, before and after training
QUICKSTART_MARKER = "quickstart.json"  # marks a directory the quickstart built
TENSORBOARD_DIR = "runs"  # TensorBoard's event files (--report-to tensorboard: transformers' logging_dir)

# ---- files of a model directory that transformers and PEFT write ----------------------------------
MODEL_CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# ---- checkpoints ------------------------------------------------------------------------------------
CHECKPOINT_MANIFEST = "chattune-checkpoint.json"  # written last: the checkpoint is complete
CHECKPOINT_STAGING = ".checkpoint-staging"  # where a checkpoint is written before it is renamed into place
CHECKPOINT_PREFIX = "checkpoint"  # checkpoint-N (transformers' PREFIX_CHECKPOINT_DIR)

# ---- the run directory's own guards ------------------------------------------------------------------
LOCK_FILE = ".chattune.lock"  # who holds the output directory (pid, host, start, command); flock-ed while held
MODEL_MANIFEST = "chattune-model.json"  # the final model's files with sizes and checksums, written last
FINAL_STAGING = ".final-staging"  # where the final model is written before its files are renamed into place
REPLACED_SUFFIX = ".replaced-"  # --overwrite moves an earlier run to OUTPUT.replaced-YYYYmmdd-HHMMSS

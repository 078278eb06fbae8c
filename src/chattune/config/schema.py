"""The configuration schema: small nested dataclasses, one schema for YAML files and command-line flags.

Each field states its default, its help text and (with `flag`) its command-line option; the flags are
generated from these fields (chattune.commands), so YAML and the command line share one set of names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chattune.outputs import CONFIG_FILE

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # --report-to: transformers' integrations chattune offers


def report_to_list(value: str | None) -> list[str]:
    """'none', one tracker, or a comma list -> the tracker names, each once (an empty list for none)."""
    names = [n.strip().lower() for n in (value or "").split(",")]
    return list(dict.fromkeys(n for n in names if n and n != "none"))


def opt(default: Any = None, help: str = "", flag: str | None = None, choices: tuple | None = None, **kw):
    """A config field; `flag` makes it a command-line option too (same name, same parsing)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if callable(default) and not isinstance(default, (str, int, float, bool)):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name: str = opt("gpt2", "hub id or local directory of a causal language model", flag="--model")
    revision: str | None = opt(None, "hub revision (branch, tag or commit)", flag="--model-revision")
    trust_remote_code: bool = opt(False, "run modelling code shipped with the model (off unless you trust it)",
                                  flag="--trust-remote-code")
    chat_template: str | None = opt(None, "a .jinja file to use as chat template instead of the model's own",
                                    flag="--chat-template")


@dataclass
class DatasetEntry:
    """One source of a mix (data.datasets); unset fields take the data section's values."""

    dataset: str = opt("", "hub id, local directory or files, as --dataset")
    split: str | None = opt(None, "split to train on (default: data.train_split)")
    samples: int | None = opt(None, "take this many valid rows, drawn with train.seed")
    fraction: float | None = opt(None, "take this share of the valid rows, drawn with train.seed")
    format: str | None = opt(None, "data format (default: data.format)", choices=(None, "auto", *FORMATS))
    columns: dict | None = opt(None, "column renames (default: data.columns)")
    config_name: str | None = opt(None, "the data set's configuration (subset) name")
    revision: str | None = opt(None, "hub revision of the data set")
    eval_split: str | None = opt(None, "also evaluate on this split of the source")


@dataclass
class DataConfig:
    dataset: str | None = opt(None, "hub id, local directory laid out like a hub data set, or "
                                    ".json/.jsonl/.parquet/.csv files (a path, a glob, or paths separated by "
                                    "commas)", flag="--dataset")
    datasets: list[DatasetEntry] = opt(list, "several data sets mixed in one run, instead of --dataset: a list of "
                                             "{dataset, split, samples or fraction, format, columns, config_name, "
                                             "revision, eval_split}")
    config_name: str | None = opt(None, "the data set's configuration (subset) name", flag="--dataset-config")
    revision: str | None = opt(None, "hub revision of the data set", flag="--dataset-revision")
    train_split: str = opt("train", "split to train on", flag="--train-split")
    eval_split: str | None = opt(None, "split to evaluate on (none: no evaluation unless --eval-fraction)",
                                 flag="--eval-split")
    eval_fraction: float = opt(0.0, "hold out this fraction of the training rows for evaluation when there "
                                    "is no eval split", flag="--eval-fraction")
    format: str = opt("auto", "data format; auto detects it from the columns", flag="--format",
                      choices=("auto", *FORMATS))
    columns: dict = opt(dict, "column renames {format_column: your_column}, e.g. {messages: dialog}")
    max_length: int | None = opt(None, "truncate conversations to this many tokens "
                                       "(default: the model's context)", flag="--max-length")
    max_train_samples: int | None = opt(None, "use at most this many training conversations",
                                        flag="--max-train-samples")
    max_eval_samples: int | None = opt(None, "use at most this many evaluation conversations",
                                       flag="--max-eval-samples")
    skip_invalid: bool = opt(False, "train on the valid rows and write the rest to rejected.jsonl "
                                    "instead of stopping", flag="--skip-invalid")
    strict_tools: bool = opt(False, "reject conversations that call a function their tools do not declare "
                                    "(by default such calls are counted in the log)", flag="--strict-tools")
    cache: bool = opt(True, "reuse the tokenized data an earlier run prepared from the same data, tokenizer, "
                            "template and max length (in $CHATTUNE_CACHE, default ~/.cache/chattune; checksummed); "
                            "--no-cache prepares afresh, reading none of datasets' caches either", flag="--cache")


@dataclass
class TrainConfig:
    output_dir: str = opt("out", "where the model, checkpoints, metrics and config go", flag="--output-dir")
    epochs: float = opt(1.0, "passes over the training data", flag="--epochs")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --epochs)",
                                flag="--max-steps")
    batch_size: int | str = opt("auto", "conversations per device per forward pass; auto: 4 without a GPU, on CUDA "
                                        "the largest that fits with the global batch (4 x --grad-accum) kept, "
                                        "accumulation lowered to match", flag="--batch-size")
    eval_batch_size: int | None = opt(None, "evaluation batch size (default: --batch-size)",
                                      flag="--eval-batch-size")
    grad_accum: int = opt(1, "forward passes per optimizer step", flag="--grad-accum")
    lr: float = opt(2e-5, "peak learning rate", flag="--lr")
    lr_scheduler: str = opt("cosine", "learning-rate schedule", flag="--lr-scheduler",
                            choices=("cosine", "linear", "constant", "constant_with_warmup"))
    warmup: float = opt(0.0, "warm-up: a fraction of the steps if below 1, else a number of steps",
                        flag="--warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay", flag="--weight-decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", flag="--max-grad-norm")
    seed: int = opt(42, "random seed for initialisation, data order and dropout", flag="--seed")
    precision: str = opt("auto", "auto: bf16 on CUDA where supported, else fp16; fp32 on CPU and MPS",
                         flag="--precision", choices=("auto", "fp32", "fp16", "bf16"))
    logging_steps: int = opt(10, "log training metrics every N optimizer steps", flag="--logging-steps")
    eval_steps: int | None = opt(None, "evaluate every N steps (default: at the end of each epoch)",
                                 flag="--eval-steps")
    save_steps: int | None = opt(None, "save a checkpoint every N steps (default: at the end of each epoch)",
                                 flag="--save-steps")
    save_total_limit: int | None = opt(2, "keep at most this many checkpoints", flag="--save-total-limit")
    save_minutes: float | None = opt(None, "also save a checkpoint whenever this many minutes have passed since the "
                                           "last one", flag="--save-minutes")
    resume: bool | str = opt(False, "continue from the newest checkpoint in --output-dir, or from a given "
                                    "checkpoint directory", flag="--resume")
    overwrite: bool = opt(False, "start afresh in a non-empty --output-dir that holds no run to resume: its contents "
                                 "are moved (never deleted) to a new sibling OUTPUT.replaced-DATE-TIME",
                          flag="--overwrite")
    group_by_length: bool = opt(True, "batch conversations of similar length together (less padding, faster; "
                                      "batches become less random)", flag="--group-by-length")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory",
                                       flag="--gradient-checkpointing")
    fixed_shapes: bool = opt(False, "pad batches to a few fixed lengths and loss-row counts, so a compiled step "
                                    "(--compile) sees few shapes; exact (padded rows carry no loss)",
                             flag="--fixed-shapes")
    compile: bool = opt(False, "torch.compile the model (CUDA; implies --fixed-shapes)", flag="--compile")
    num_workers: int | None = opt(None, "data-loader worker processes (default: 2 on CUDA, collating the next "
                                        "batches while the GPU computes; 0 elsewhere)", flag="--num-workers")
    attention_dropout: float | None = opt(0.0, "attention-probability dropout while training (null: the model's "
                                               "own, gpt2's 0.1). 0 lets PyTorch's fused attention run, which on a "
                                               "CPU cut a step's time by about a third and its memory by 0.8 GiB "
                                               "(bench/); recent chat models train with 0. The saved config keeps "
                                               "the model's value", flag="--attention-dropout")
    eval_baseline: bool = opt(True, "also score the base model on the evaluation split, for the before/after "
                                    "comparison in report.md (one extra evaluation pass)", flag="--eval-baseline")
    report_to: str = opt("none", f"experiment trackers: none, or any of {', '.join(TRACKERS)} (comma-separated); "
                                 "TensorBoard writes to OUTPUT/runs/", flag="--report-to")
    run_name: str | None = opt(None, "the run's name in the trackers (default: the output directory's name)",
                               flag="--run-name")
    early_stopping_patience: int | None = opt(None, "stop after N evaluations without the evaluation loss improving",
                                              flag="--early-stopping-patience")
    early_stopping_threshold: float = opt(0.0, "an improvement is a drop of more than this",
                                          flag="--early-stopping-threshold")
    load_best: bool = opt(False, "the checkpoint with the lowest evaluation loss becomes the final model",
                          flag="--load-best")


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "train a LoRA adapter (PEFT) instead of every weight", flag="--lora")
    qlora: bool = opt(False, "LoRA on a 4-bit base model (bitsandbytes; needs a CUDA GPU)", flag="--qlora")
    r: int = opt(16, "LoRA rank", flag="--lora-r")
    alpha: int = opt(32, "LoRA scaling alpha (the update is scaled by alpha / r)", flag="--lora-alpha")
    dropout: float = opt(0.05, "dropout on the LoRA input", flag="--lora-dropout")
    target_modules: list[str] | None = opt(None, "comma-separated module names to adapt, or all-linear (default: "
                                                 "c_attn,c_proj,c_fc for GPT-2, all linear layers otherwise)",
                                           flag="--lora-target-modules")
    merge: bool = opt(False, "after training, also write a standalone merged model to OUTPUT/merged",
                      flag="--merge")


# TRL's DPO loss types (DPOConfig.loss_type); several joined by commas are summed (sigmoid,sft: RPO)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# `chattune dpo`'s own defaults for train.*: SmolLM2's DPO of its 135M/360M models (alignment-handbook
# recipes/smollm2), the published recipe closest to chattune's small models; Zephyr-7B used beta 0.01, lr 5e-7,
# 1 epoch (docs/dpo.md)
DPO_TRAIN_DEFAULTS = {"lr": 1e-6, "epochs": 2.0}


@dataclass
class DpoConfig:
    """`chattune dpo` only (preference tuning); `chattune train` ignores it."""

    beta: float = opt(0.5, "DPO beta: how strongly the model is held to the reference (the starting model); "
                           "SmolLM2's small-model recipe used 0.5, Zephyr-7B 0.01", flag="--beta")
    loss_type: str = opt("sigmoid", f"TRL's DPO loss: {', '.join(DPO_LOSS_TYPES)}; several joined by commas are "
                                    "summed (sigmoid,sft adds the chosen replies' NLL: RPO)", flag="--loss-type")
    precompute_ref: bool = opt(False, "score the pairs with the starting model once before training instead of "
                                      "keeping a reference copy in memory", flag="--precompute-ref")

    def loss_types(self) -> list[str]:
        return [t.strip() for t in self.loss_type.split(",") if t.strip()]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        return path


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig,
                              "dpo": DpoConfig}


def fields_of(section_cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(section_cls)}

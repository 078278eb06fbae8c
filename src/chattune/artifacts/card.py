"""The model card (README.md) uploaded with a model: built from the run's chattune.yaml, results.json and
quickstart score; the prose is templates/model_card.md.jinja. Local paths never reach it: a base model or
data set that is not a hub id is named by its last path part only."""

from __future__ import annotations

import re
from pathlib import Path

from chattune.artifacts.render import fmt_number, metric_rows, preference_rows, read_json, render
from chattune.config import read_saved
from chattune.outputs import ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE, REPORT_FILE, RESULTS_FILE, TASK_SCORE_FILE

_LOCAL = re.compile(r"^(\.|/|~)|^[A-Za-z]:\\")


def hub_id(name) -> str | None:
    """A name that can go in the card's metadata: a hub id, not a path on this machine."""
    if not isinstance(name, str) or not name or _LOCAL.search(name) or Path(name).expanduser().exists():
        return None
    return name if re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) else None


def _describe(name, kind: str = "model") -> str:
    hub = hub_id(name)
    if hub:
        return f"[`{hub}`](https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{hub})"
    # a local path: only its last part, since the rest is about this machine, not the model
    what = "local model directory" if kind == "model" else "local data set"
    return f"`{Path(str(name)).name}` (a {what})" if name else "unknown"


def training_sources(d: dict) -> list[tuple[str, str | None]]:
    """(data set, training split) of each source in a saved config: --dataset, or every entry of a mix."""
    if d.get("dataset"):
        return [(d["dataset"], d.get("train_split"))]
    return [(e["dataset"], e.get("split") or d.get("train_split")) for e in d.get("datasets") or []
            if isinstance(e, dict) and e.get("dataset")]


def _hyperparameters(t: dict, d: dict, results: dict, base) -> list[tuple[str, object]]:
    run = results.get("train") or {}
    runtime = run.get("train_runtime")
    # what the run did (the trainer's final state), not what the config asked: a max-steps run stops mid-epoch
    epochs = run.get("epoch")
    rows = [("base model", _describe(base)),
            ("epochs run", round(float(epochs), 2) if epochs is not None else None),
            ("epochs", t.get("epochs") if epochs is None else None), ("max steps", t.get("max_steps")),
            ("batch size per device", t.get("batch_size")), ("gradient accumulation", t.get("grad_accum")),
            ("learning rate", t.get("lr")), ("schedule", t.get("lr_scheduler")), ("warm-up", t.get("warmup")),
            ("weight decay", t.get("weight_decay")), ("max length", d.get("max_length")),
            ("precision", results.get("precision") or t.get("precision")), ("seed", t.get("seed")),
            ("steps run", run.get("global_step")),
            ("training time (s)", runtime if runtime is None else fmt_number(float(runtime)))]
    return [(k, v) for k, v in rows if v is not None]


def local_path(name) -> bool:
    """Whether a model name is a path on this machine (chattune makes a local base absolute in an adapter's
    config, so that the adapter finds it from anywhere) rather than a hub id."""
    return isinstance(name, str) and bool(_LOCAL.search(name))


def samples_in_report(model_dir: Path) -> tuple[int, str]:
    """(number of conversations the run report quotes verbatim, 'held-out' or 'training')."""
    report = model_dir / REPORT_FILE
    return report_samples(report.read_text(encoding="utf-8", errors="replace")) if report.is_file() else (0, "")


def adapter_base(model_dir: Path) -> str | None:
    """The base model an adapter directory names in adapter_config.json (None for a full model)."""
    if (model_dir / MODEL_CONFIG_FILE).is_file() or not (model_dir / ADAPTER_CONFIG_FILE).is_file():
        return None
    return read_json(model_dir / ADAPTER_CONFIG_FILE).get("base_model_name_or_path")


def report_samples(text: str) -> tuple[int, str]:
    """(number of sample exchanges in a run report, where they come from: 'held-out' or 'training')."""
    if "## Sample exchanges" not in text:
        return 0, ""
    section = text.split("## Sample exchanges", 1)[1].split("\n## ", 1)[0]
    return section.count("**Sample "), "held-out" if "held-out conversations" in section else "training"


def build_card(model_dir: Path, repo_id: str, samples: bool = True) -> str:
    """The model card; `samples` False says the report was uploaded without its sample exchanges."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = read_saved(model_dir)
    results = read_json(model_dir / RESULTS_FILE)
    m, d, t = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("train") or {}
    base, sources = m.get("name"), training_sources(d)
    adapter = (model_dir / ADAPTER_CONFIG_FILE).is_file() and not (model_dir / MODEL_CONFIG_FILE).is_file()
    from_adapter = adapter_base(model_dir) if adapter else None
    if local_path(from_adapter) or (from_adapter and not base):
        base = from_adapter  # what the adapter was trained on: a local directory stays local in the card
    local_base = adapter and not hub_id(base)  # the adapter cannot find its base on the hub by itself
    hub_sets = [h for h in dict.fromkeys(hub_id(name) for name, _ in sources) if h]
    meta = ModelCardData(library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
                         base_model=hub_id(base), datasets=hub_sets or None,
                         tags=["chattune", "trl", "dpo" if results.get("dpo") else "sft", "conversational"]
                         + (["lora"] if adapter else []))
    data = (_describe(sources[0][0], "dataset") if len(sources) == 1 else
            "a mix of " + ", ".join(f"{_describe(n, 'dataset')} (split `{sp}`)" for n, sp in sources)
            if sources else "unknown")
    final, before = results.get("eval") or {}, results.get("baseline") or {}
    task = read_json(model_dir / TASK_SCORE_FILE)
    n_samples, samples_from = samples_in_report(model_dir)
    dpo = results.get("dpo")  # a `chattune dpo` run: preference pairs and preference metrics
    body = render("model_card.md.jinja", name=repo_id.split("/")[-1], base=_describe(base), data=data,
                  sources=sources, eval_split=d.get("eval_split"), dpo=dpo,
                  data_stats=[(k, s) for k, s in (results.get("data") or {}).items() if s],
                  max_length=results.get("max_length"), hyperparameters=_hyperparameters(t, d, results, base) if t
                  else [], metrics=preference_rows(results) if dpo else metric_rows(final, before),
                  has_baseline=bool(before) or bool(dpo),
                  task=task if {"metric", "before", "after"} <= set(task) else None,
                  has_report=(model_dir / REPORT_FILE).is_file(), repo_id=repo_id, adapter=adapter,
                  local_base=local_base,
                  n_samples=n_samples, samples_from=samples_from, samples_uploaded=samples)
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + body))

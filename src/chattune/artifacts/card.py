"""The model card (README.md) uploaded with a model: built from the run's chattune.yaml, results.json and
quickstart score; the prose is templates/model_card.md.jinja. Local paths never reach it: a base model or
data set that is not a hub id is named by its last path part only."""

from __future__ import annotations

import json
import re
from pathlib import Path

from chattune.artifacts.render import fmt_number, metric_rows, render
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


def build_card(model_dir: Path, repo_id: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = read_saved(model_dir)
    results = json.loads((model_dir / RESULTS_FILE).read_text()) if (model_dir / RESULTS_FILE).is_file() else {}
    m, d, t = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("train") or {}
    base, sources = m.get("name"), training_sources(d)
    hub_sets = [h for h in dict.fromkeys(hub_id(name) for name, _ in sources) if h]
    adapter = (model_dir / ADAPTER_CONFIG_FILE).is_file() and not (model_dir / MODEL_CONFIG_FILE).is_file()
    meta = ModelCardData(library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
                         base_model=hub_id(base), datasets=hub_sets or None,
                         tags=["chattune", "trl", "sft", "conversational"] + (["lora"] if adapter else []))
    data = (_describe(sources[0][0], "dataset") if len(sources) == 1 else
            "a mix of " + ", ".join(f"{_describe(n, 'dataset')} (split `{sp}`)" for n, sp in sources)
            if sources else "unknown")
    final, before = results.get("eval") or {}, results.get("baseline") or {}
    task = json.loads((model_dir / TASK_SCORE_FILE).read_text()) if (model_dir / TASK_SCORE_FILE).is_file() else {}
    body = render("model_card.md.jinja", name=repo_id.split("/")[-1], base=_describe(base), data=data,
                  sources=sources, eval_split=d.get("eval_split"),
                  data_stats=[(k, s) for k, s in (results.get("data") or {}).items() if s],
                  max_length=results.get("max_length"), hyperparameters=_hyperparameters(t, d, results, base) if t
                  else [], metrics=metric_rows(final, before), has_baseline=bool(before),
                  task=task if {"metric", "before", "after"} <= set(task) else None,
                  has_report=(model_dir / REPORT_FILE).is_file(), repo_id=repo_id)
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + body))

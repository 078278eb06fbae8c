"""`chattune eval`: assistant-token loss, perplexity and accuracy of a model on a data set (by default the
run's own held-out data), optionally against a baseline on the very same tokens, with sample replies."""

from __future__ import annotations

import json
import math

from chattune.commands import default
from chattune.commands.generate import add_model_argument
from chattune.config import FORMATS, Config, apply_values, read_saved
from chattune.errors import ChattuneError
from chattune.verbosity import quiet


def add_arguments(p) -> None:
    add_model_argument(p)
    p.add_argument("--dataset", help="hub id, local hub-layout directory or file (default: the data set MODEL was "
                                     "trained on, from its chattune.yaml)")
    p.add_argument("--split", help="split to score (default: the run's evaluation split)")
    p.add_argument("--dataset-config", help="the data set's configuration (subset) name")
    p.add_argument("--format", default=None, choices=("auto", *FORMATS), help="data format (default: the run's, "
                                                                              "else auto)")
    p.add_argument("--max-samples", type=int, default=None, help="score at most this many conversations")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate conversations to this many tokens (default: the run's, else the model's context)")
    p.add_argument("--batch-size", type=int, default=default(run_eval, "batch_size"),
                   help="conversations per forward pass (default: %(default)s)")
    p.add_argument("--baseline", metavar="OTHER_MODEL",
                   help="also score this model on the same token sequences and report the difference")
    p.add_argument("--samples", type=int, default=0, metavar="N", help="generate N replies next to the references")
    p.add_argument("--sample-tokens", type=int, default=default(run_eval, "sample_tokens"),
                   help="longest sample reply in tokens (default: %(default)s)")
    p.add_argument("--tool-turns", type=int, default=default(run_eval, "tool_turns"), metavar="N",
                   help="when the data calls tools: score the model's calls at up to N assistant tool-call turns "
                        "(and N answers to tool results); 0 skips it (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args) -> int:
    from chattune.evaluation.preferences import format_preference_report

    result = run_eval(args.model, dataset=args.dataset, split=args.split, config_name=args.dataset_config,
                      fmt=args.format, max_samples=args.max_samples, max_length=args.max_length,
                      batch_size=args.batch_size, baseline=args.baseline, samples=args.samples,
                      sample_tokens=args.sample_tokens, device=args.device, tool_turns=args.tool_turns)
    text = format_preference_report(result) if "preference" in result else format_report(result)
    print(json.dumps(jsonable(result), indent=2, ensure_ascii=False) if args.json else text)
    return 0


def preference_split(model_path, dataset, split, config_name, max_samples):
    """The split to score when it holds preference pairs (chosen and rejected columns), else None: as given, or
    the run's own (a `chattune dpo` output names its data set and evaluation split)."""
    from chattune.data import list_splits
    from chattune.data.preferences import PREFERENCE_SPLITS, is_preference_data, load_preferences, preference_columns

    saved = read_saved(model_path).get("data") or {}
    same = dataset is None or dataset == saved.get("dataset")
    dataset = dataset or saved.get("dataset")
    if not dataset:
        return None
    config_name = config_name or (saved.get("config_name") if same else None)
    if split is None:
        available = list_splits(dataset, config_name)
        split = (saved.get("eval_split") if same and saved.get("eval_split") in available else
                 PREFERENCE_SPLITS[1] if PREFERENCE_SPLITS[1] in available else
                 available[0] if len(available) == 1 else None)
        if split is None:
            return None  # the chat-data path asks for --split
    if not is_preference_data(preference_columns(dataset, split, config_name)):
        return None
    return load_preferences(dataset, split, config_name=config_name, max_samples=max_samples)


def eval_data(model_path, dataset, split, config_name, fmt, max_samples):
    """The conversations to score: as given, or by default the run's own held-out data."""
    from chattune.data import list_splits, load_conversations
    from chattune.data.mixture import load_training_data

    run = read_saved(model_path)
    saved = run.get("data") or {}
    if dataset is None and split is None and (saved.get("dataset") or saved.get("datasets")):
        # the run's own evaluation data, built as training built it (its split or held-out rows, mixes,
        # skipped rows, revisions); a run without any asks for --split below
        cfg = apply_values(Config(), {k: v for k, v in run.items() if k in ("data", "train")}, str(model_path))
        _, held = load_training_data(cfg)
        if held is not None:
            if max_samples is not None and len(held.dataset) > max_samples:
                held.dataset = held.dataset.select(range(max_samples))
            return held
    same = dataset is None or dataset == saved.get("dataset")
    dataset = dataset or saved.get("dataset")
    if not dataset:
        raise ChattuneError(f"give --dataset: {model_path} has no chattune.yaml naming the data set it was trained on")
    kw = dict(fmt=fmt or (saved.get("format") if same else None) or "auto",
              columns=(saved.get("columns") if same else None) or {},
              config_name=config_name or (saved.get("config_name") if same else None))
    if split is None:
        available = list_splits(dataset, kw["config_name"])
        if len(available) != 1:
            raise ChattuneError(f"give --split: {dataset} has splits {', '.join(available)}")
        split = available[0]
    return load_conversations(dataset, split, max_samples=max_samples, **kw)


@quiet
def run_eval(model_path: str, dataset: str | None = None, split: str | None = None, config_name: str | None = None,
             fmt: str | None = None, max_samples: int | None = None, max_length: int | None = None,
             batch_size: int = 8, baseline: str | None = None, samples: int = 0, sample_tokens: int = 64,
             device: str | None = None, tool_turns: int = 200) -> dict:
    """Score MODEL (and optionally a baseline on the very same token sequences) on a data set; on data with tool
    calls, also the model's tool-call accuracy (evaluation/toolcalls.py) at up to `tool_turns` turns."""
    import gc

    import torch

    from chattune.data.loading import sample_prompts
    from chattune.data.tokenize import prepare_split
    from chattune.evaluation.compare import score_baseline
    from chattune.inference.generate import generate_replies
    from chattune.model.hub import load_config
    from chattune.model.load import context_length, load_chat_model, pick_device, resolve_max_length
    from chattune.training.metrics import score_rows

    if batch_size < 1 or samples < 0 or sample_tokens < 1 or (max_samples is not None and max_samples < 1) or \
            tool_turns < 0:
        raise ChattuneError("--batch-size, --sample-tokens and --max-samples must be at least 1, --samples and "
                            "--tool-turns >= 0")
    prefs = preference_split(model_path, dataset, split, config_name, max_samples)
    if prefs is not None:  # preference pairs: preference accuracy (and the implicit reward against --baseline)
        from chattune.evaluation.preferences import evaluate_preferences

        return evaluate_preferences(model_path, prefs, max_length, batch_size, baseline, device,
                                    seed=(read_saved(model_path).get("train") or {}).get("seed", 42))
    data = eval_data(model_path, dataset, split, config_name, fmt, max_samples)
    device = device or pick_device()
    saved = read_saved(model_path)
    model, tokenizer = load_chat_model(model_path, device, dtype=torch.float32)
    length = resolve_max_length(max_length or (saved.get("data") or {}).get("max_length"),
                                context_length(model.config), model_path)
    if baseline:
        # both models score the same sequences, so they must fit the shorter context
        length = min(length, context_length(load_config(baseline)) or length)
    kind = "text" if data.format == "text" else "messages"
    rows, stats = prepare_split(data.dataset, tokenizer, length, kind)
    if stats.rows_out == 0:
        raise ChattuneError(f"{data.name}: no conversation keeps an assistant token within max length {length}")
    result = {"model": model_path, "data": data.name, "conversations": stats.rows_out, "max_length": length,
              "truncated": stats.truncated, "dropped": stats.dropped_no_loss,
              **score_rows(model, rows, tokenizer.pad_token_id, batch_size)}
    if tool_turns and kind == "messages":
        from chattune.evaluation.toolcalls import has_tool_calls, score_tool_calls

        if has_tool_calls(data.dataset):
            result["tool_calls"] = score_tool_calls(model, tokenizer, data.dataset, tool_turns, batch_size)
    prompts = (sample_prompts(data.dataset, samples)
               if samples and kind == "messages" else [])
    if prompts:
        # a held-out conversation longer than the context is cut from the left (the reply needs room)
        replies = generate_replies(model, tokenizer, [p for p, _ in prompts], sample_tokens, fit="left")
        result["samples"] = [{"messages": p, "reference": ref, "reply": r["reply"], "cut": r["cut"]}
                             for (p, ref), r in zip(prompts, replies)]
    if baseline:
        del model
        gc.collect()
        b = score_baseline(baseline, tokenizer, data.dataset, kind, rows, length, batch_size, device,
                           seed=(saved.get("train") or {}).get("seed", 42), prompts=prompts,
                           sample_tokens=sample_tokens, reference_name=model_path)
        for s, reply in zip(result.get("samples", []), b.pop("sample_replies")):
            s["baseline_reply"] = reply
        result["baseline"] = b
        result["difference"] = {k: result[k] - b[k] for k in ("loss", "perplexity", "accuracy")}
    return result


def jsonable(value):
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_report(r: dict) -> str:
    lines = [f"{r['data']}: {r['conversations']} conversations, {r['tokens']} loss tokens (max length "
             f"{r['max_length']}" + (f"; {r['truncated']} truncated" if r["truncated"] else "")
             + (f"; {r['dropped']} dropped, no assistant token left" if r["dropped"] else "") + ")", "",
             f"{'':<11}{'loss':>9}{'perplexity':>12}{'accuracy':>10}{'tokens':>9}"]

    def row(label, m, name=""):
        return (f"{label:<11}{m['loss']:>9.4f}{m['perplexity']:>12.2f}{m['accuracy']:>10.2%}{m['tokens']:>9}"
                f"   {name}").rstrip()

    lines.append(row("model", r, r["model"]))
    if "baseline" in r:
        b, d = r["baseline"], r["difference"]
        lines.append(row("baseline", b, b["model"]))
        lines.append(f"{'difference':<11}{d['loss']:>+9.4f}{d['perplexity']:>+12.2f}{d['accuracy'] * 100:>+9.2f}pt")
    t = r.get("tool_calls")
    if t:
        lines += ["", f"tool calls: {t['call_accuracy']:.1%} of {t['call_turns']} call turns right (name and "
                      f"arguments); right name {t['name_accuracy']:.1%}; a call parsed {t['parsed_rate']:.1%}"
                      + (f"; {t['invalid_calls']} call block(s) not valid JSON" if t["invalid_calls"] else "")]
        if "answer_exact_match" in t:
            lines.append(f"answers to tool results: {t['answer_exact_match']:.1%} of {t['answer_turns']} exact")
    for i, s in enumerate(r.get("samples", []), 1):
        lines += ["", f"sample {i}"]
        earlier = len(s["messages"]) - 1
        lines.append(f"  {s['messages'][-1]['role'] + ':':<11}{_one_line(s['messages'][-1]['content'])}"
                     + (f"   (+{earlier} earlier messages)" if earlier else ""))
        if s.get("cut"):
            lines.append(f"  {'':<11}(cut to fit the context: {s['cut']})")
        lines.append(f"  {'reference:':<11}{_one_line(s['reference'])}")
        lines.append(f"  {'model:':<11}{_one_line(s['reply'])}")
        if "baseline_reply" in s:
            lines.append(f"  {'baseline:':<11}{_one_line(s['baseline_reply'])}")
    return "\n".join(lines)

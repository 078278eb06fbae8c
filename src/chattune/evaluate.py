"""Evaluation: loss on assistant tokens (mean over tokens, not over batches), perplexity and
next-token accuracy, from the same selective head that training uses."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from chattune.errors import ChattuneError
from chattune.loss import fast_loss_supported, full_logits_loss_sum, install_selective_head


def batch_stats(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, loss-token count, correct top-1 count) for one padded batch."""
    if fast_loss_supported(model):
        install_selective_head(model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    selective_labels=batch["labels"], with_accuracy=True)
        return out["loss_sum"].float(), out["n_tokens"], out["n_correct"]
    return full_logits_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def summarize(loss_sum: float, tokens: int, correct: int) -> dict:
    loss = loss_sum / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf") if tokens else float("nan"),
        "accuracy": correct / tokens if tokens else float("nan"),
        "tokens": int(tokens),
    }


@torch.no_grad()
def evaluate_batches(model, batches, device=None, autocast=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum statistics over an iterable of batches; returns tensors so callers can reduce across ranks."""
    was_training = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=dev)
    for batch in batches:
        batch = {k: v.to(dev) for k, v in batch.items()}
        if autocast is not None:
            with autocast():
                s, n, c = batch_stats(model, batch)
        else:
            s, n, c = batch_stats(model, batch)
        totals += torch.stack([s.double(), n.double(), c.double()])
    if was_training:
        model.train()
    return totals


# ---- scoring whole models: `chattune eval`, and the run report's before/after -------------------


def eval_autocast(device: str):
    """Mixed precision on CUDA as training uses it; fp32 elsewhere."""
    if device != "cuda":
        return None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def score_rows(model, rows, pad_token_id: int, batch_size: int = 8) -> dict:
    """Token-weighted loss, perplexity and accuracy of `model` on tokenized rows (input_ids, labels)."""
    from torch.utils.data import DataLoader

    from chattune.collate import PadCollator

    device = next(model.parameters()).device
    lengths = rows["length"]
    # the longest batch first, so that running out of memory shows at once
    rows = rows.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    loader = DataLoader(rows.select_columns(["input_ids", "labels"]), batch_size=batch_size,
                        collate_fn=PadCollator(pad_token_id))
    totals = evaluate_batches(model, loader, device=device, autocast=eval_autocast(device.type))
    return summarize(*totals.tolist())


def load_baseline(name: str, reference_tokenizer, device: str, seed: int = 42, template_file: str | None = None):
    """A model to compare against, set up as training set up its base model: the same template
    preparation (added tokens, pad), the reference's chat template, and, with the run's seed, the
    same initial rows for added tokens, so a run's base model comes back exactly as training began."""
    from transformers import set_seed

    from chattune.model import fit_model_to_tokenizer, load_model, load_tokenizer
    from chattune.template import prepare_tokenizer

    tokenizer = load_tokenizer(name)
    setup = prepare_tokenizer(tokenizer, template_file)
    tokenizer.chat_template = reference_tokenizer.chat_template
    set_seed(seed)
    model = load_model(name)
    fit_model_to_tokenizer(model, tokenizer, setup)
    return model.to(device).eval(), tokenizer


def check_aligned(rows, other_rows, tokenizer, name: str, other: str) -> None:
    """Both models must be scored on identical token sequences, or their losses do not compare."""
    if len(rows) != len(other_rows):
        raise ChattuneError(f"{other} keeps {len(other_rows)} conversations within the max length and {name} keeps "
                            f"{len(rows)}: their tokenizers differ, so the losses would not be comparable")
    for i, (a, b, la, lb) in enumerate(zip(rows["input_ids"], other_rows["input_ids"], rows["labels"],
                                           other_rows["labels"])):
        if a != b or la != lb:
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ChattuneError(
                f"{other} splits the conversations into different tokens than {name} (conversation {i}, token {j}: "
                f"{tokenizer.decode(a[j:j + 3])!r} ...), so per-token losses are not comparable; give the model "
                f"{name} was fine-tuned from, or one with the same tokenizer, as --baseline")


def sample_prompts(conversations, n: int) -> list[tuple[list[dict], str]]:
    """(conversation up to its last assistant reply, that reply) for the first n conversations."""
    out = []
    for conv in conversations[:n]:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        out.append(([{"role": m["role"], "content": m["content"]} for m in conv[:last]], conv[last]["content"]))
    return out


def _saved_run(model_path: str) -> dict:
    import yaml

    from chattune.config import CONFIG_FILENAME

    path = Path(model_path) / CONFIG_FILENAME
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def _eval_data(model_path, dataset, split, config_name, fmt, max_samples):
    """The conversations to score: as given, or by default the run's own held-out data."""
    from chattune.config import Config, apply_values
    from chattune.data import list_splits, load_conversations
    from chattune.data.mixture import load_training_data

    run = _saved_run(model_path)
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


def _samples(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    from chattune.infer import generate_replies

    return [r["reply"] for r in generate_replies(model, tokenizer, [p for p, _ in prompts], max_new_tokens)]


def run_eval(model_path: str, dataset: str | None = None, split: str | None = None, config_name: str | None = None,
             fmt: str | None = None, max_samples: int | None = None, max_length: int | None = None,
             batch_size: int = 8, baseline: str | None = None, samples: int = 0, sample_tokens: int = 64,
             device: str | None = None) -> dict:
    """Score MODEL (and optionally a baseline on the very same token sequences) on a data set."""
    import gc

    from chattune.infer import load_chat_model
    from chattune.model import context_length, load_config, pick_device
    from chattune.tokenize import prepare_split
    from chattune.train import resolve_max_length

    if batch_size < 1 or samples < 0 or sample_tokens < 1 or (max_samples is not None and max_samples < 1):
        raise ChattuneError("--batch-size, --sample-tokens and --max-samples must be at least 1, --samples >= 0")
    data = _eval_data(model_path, dataset, split, config_name, fmt, max_samples)
    device = device or pick_device()
    saved = _saved_run(model_path)
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
    prompts = (sample_prompts(data.dataset.select(range(min(samples, len(data.dataset))))["messages"], samples)
               if samples and kind == "messages" else [])
    if prompts:
        result["samples"] = [{"messages": p, "reference": ref, "reply": reply}
                             for (p, ref), reply in zip(prompts, _samples(model, tokenizer, prompts, sample_tokens))]
    if baseline:
        del model
        gc.collect()
        seed = (saved.get("train") or {}).get("seed", 42)
        base, base_tok = load_baseline(baseline, tokenizer, device, seed=seed)
        base_rows, _ = prepare_split(data.dataset, base_tok, length, kind)
        check_aligned(rows, base_rows, tokenizer, model_path, baseline)
        b = {"model": baseline, **score_rows(base, base_rows, base_tok.pad_token_id, batch_size)}
        result["baseline"] = b
        result["difference"] = {k: result[k] - b[k] for k in ("loss", "perplexity", "accuracy")}
        for s, reply in zip(result.get("samples", []), _samples(base, base_tok, prompts, sample_tokens) if prompts
                            else []):
            s["baseline_reply"] = reply
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
    for i, s in enumerate(r.get("samples", []), 1):
        lines += ["", f"sample {i}"]
        earlier = len(s["messages"]) - 1
        lines.append(f"  {s['messages'][-1]['role'] + ':':<11}{_one_line(s['messages'][-1]['content'])}"
                     + (f"   (+{earlier} earlier messages)" if earlier else ""))
        lines.append(f"  {'reference:':<11}{_one_line(s['reference'])}")
        lines.append(f"  {'model:':<11}{_one_line(s['reply'])}")
        if "baseline_reply" in s:
            lines.append(f"  {'baseline:':<11}{_one_line(s['baseline_reply'])}")
    return "\n".join(lines)

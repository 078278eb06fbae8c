"""The run report: OUTPUT/report.md, what a person reads instead of the logs.

It opens with loss curves (PNG, drawn with matplotlib from metrics.jsonl), then the final metrics
(before/after when the base model was scored on the same held-out tokens), sample exchanges, data
statistics and the resolved config. Written at the end of every `chattune train`; a failure here
is logged and never costs the trained model.
"""

from __future__ import annotations

import gc
import html
import json
import logging
import re
from pathlib import Path

from chattune.data.mixture import sources

log = logging.getLogger("chattune")
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
N_SAMPLES = 3
SAMPLE_TOKENS = 64


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(training log records, evaluation records) from OUTPUT/metrics.jsonl."""
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def plot_curves(out: Path, train: list[dict], evals: list[dict], baseline_loss: float | None = None) -> list[tuple]:
    """Write the plots; returns (alt text, relative path) for each one written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    (out / PLOTS_DIR).mkdir(exist_ok=True)
    written = []
    if train or evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", lw=1.5)
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="evaluation loss", lw=1.5)
        if baseline_loss is not None:
            ax.plot([0], [baseline_loss], "s", color="gray", label=f"base model, evaluation ({baseline_loss:.3f})")
        values = [r["loss"] for r in train] + [r["eval_loss"] for r in evals] + [baseline_loss or 0]
        positive = [v for v in values if v and v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # a random-init baseline would flatten the curves on a linear axis
        ax.set(xlabel="optimizer step", ylabel="mean loss per token", title="Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / PLOTS_DIR / "loss.png", dpi=110)
        plt.close(fig)
        written.append(("Training and evaluation loss", f"{PLOTS_DIR}/loss.png"))
    series = [(key, label) for key, label in (("lr", "learning rate"), ("grad_norm", "gradient norm"),
                                              ("tokens_per_second", "tokens per second"))
              if any(r.get(key) is not None for r in train)]
    if series:
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 1.9 * len(series) + 0.6), sharex=True, squeeze=False)
        for ax, (key, label) in zip(axes[:, 0], series):
            points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
            ax.plot(*zip(*points), lw=1.2)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.suptitle("Schedule and throughput")
        fig.tight_layout()
        fig.savefig(out / PLOTS_DIR / "training.png", dpi=110)
        plt.close(fig)
        written.append(("Learning rate, gradient norm and throughput", f"{PLOTS_DIR}/training.png"))
    return written


def _cell(text, limit: int = 400) -> str:
    """Conversation text as a table cell: escaped (data may hold HTML or pipes) and on one line."""
    text = re.sub(r"\n\s*\n", "\n", str(text).strip())
    if not text:
        return "_(empty)_"
    if len(text) > limit:
        text = text[:limit] + " ..."
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>")


def fmt_number(v, pct: bool = False) -> str:
    """A metric for a markdown table: 4 significant digits, or a percentage; '-' when missing."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2%}" if pct else f"{v:.4g}"
    return str(v)


def sample_budget(tokenizer, prompts) -> int:
    """New tokens for the sample replies: room for twice the longest reference, at most SAMPLE_TOKENS,
    so short answers (the quickstart's sums) cost a few steps, not 64."""
    if tokenizer is None or not prompts:
        return SAMPLE_TOKENS
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in prompts)
    return max(16, min(SAMPLE_TOKENS, 2 * longest + 4))


def evaluate_baseline(cfg, tokenizer, eval_split, eval_rows, prompts, budget: int) -> dict | None:
    """Score the run's base model on the evaluation rows training scored, and answer the sample
    prompts with it: the 'before' of the report."""
    from chattune.evaluate import check_aligned, load_baseline, score_rows
    from chattune.infer import generate_replies
    from chattune.model import pick_device
    from chattune.tokenize import prepare_split

    device = pick_device()
    model, base_tok = load_baseline(cfg.model.name, tokenizer, device, seed=cfg.train.seed,
                                    template_file=cfg.model.chat_template)
    # the rows were made with the training tokenizer; prove the base one gives the same on a sample
    probe = eval_split.dataset.select(range(min(64, len(eval_split.dataset))))
    kind = "text" if eval_split.format == "text" else "messages"
    mine, _ = prepare_split(probe, tokenizer, cfg.data.max_length, kind)
    theirs, _ = prepare_split(probe, base_tok, cfg.data.max_length, kind)
    check_aligned(mine, theirs, tokenizer, "the fine-tuned model", cfg.model.name)
    stats = score_rows(model, eval_rows, base_tok.pad_token_id, cfg.train.eval_batch_size or cfg.train.batch_size)
    replies = generate_replies(model, base_tok, [p for p, _ in prompts], budget) if prompts else []
    del model
    gc.collect()
    return {"model": cfg.model.name, **{f"eval_{k}": v for k, v in stats.items()},
            "sample_replies": [r["reply"] for r in replies]}


def _sample_rows(out: Path, prompts, base_replies, budget: int) -> list[str]:
    from chattune.infer import generate_replies, load_chat_model

    model, tok = load_chat_model(str(out))
    replies = generate_replies(model, tok, [p for p, _ in prompts], budget)
    del model
    gc.collect()
    lines = []
    for i, ((prompt, ref), reply) in enumerate(zip(prompts, replies), 1):
        earlier = len(prompt) - 1
        lines += [f"**Sample {i}**" + (f" ({earlier} earlier message(s) not shown)" if earlier else ""), "",
                  "| | |", "| --- | --- |", f"| {prompt[-1]['role']} | {_cell(prompt[-1]['content'])} |",
                  f"| reference | {_cell(ref)} |", f"| fine-tuned | {_cell(reply['reply'])} |"]
        if base_replies:
            lines.append(f"| base model | {_cell(base_replies[i - 1])} |")
        lines.append("")
    return lines


def _metrics_table(results: dict, train: list[dict], baseline: dict | None) -> list[str]:
    final = results.get("eval") or {}
    head = "| metric | base model | fine-tuned |" if baseline else "| metric | fine-tuned |"
    lines = [head, "| --- | --- | --- |" if baseline else "| --- | --- |"]

    def row(label, key, pct=False):
        if key not in final:
            return
        cells = ([fmt_number(baseline.get(key), pct)] if baseline else []) + [fmt_number(final[key], pct)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("evaluation loss (per assistant token)", "eval_loss")
    row("perplexity", "eval_perplexity")
    row("next-token accuracy", "eval_accuracy", pct=True)
    row("evaluation tokens", "eval_tokens")
    t = results.get("train") or {}
    extra = [("final training loss", train[-1]["loss"] if train else None), ("optimizer steps", train[-1]["step"]
             if train else None), ("training time (s)", t.get("train_runtime")),
             ("mean training loss", t.get("train_loss"))]
    for label, v in extra:
        if v is not None:
            lines.append(f"| {label} | " + ("- | " if baseline else "") + f"{fmt_number(v)} |")
    return lines


def _data_table(results: dict, train_split, eval_split, out: Path) -> list[str]:
    lines = ["| split | source | conversations | tokens | loss tokens | truncated | dropped (no loss token left) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, split in (("train", train_split), ("eval", eval_split)):
        s = (results.get("data") or {}).get(key)
        if not s:
            continue
        name = split.name if split is not None else key
        lines.append(f"| {key} | {_cell(name)} | {s['rows_out']} | {s['tokens']} | {s['loss_tokens']} | "
                     f"{s['truncated']} | {s['dropped_no_loss']} |")
    rejected = out / "rejected.jsonl"
    if rejected.exists():
        n = sum(1 for _ in open(rejected))
        lines += ["", f"{n} invalid row(s) were skipped; each is in `rejected.jsonl` with its reason."]
    fmt = train_split.format if train_split is not None else None
    return lines + ([f"", f"Data format: `{fmt}`; max length {results.get('max_length')} tokens."] if fmt else [])


def write_run_report(cfg, out, tokenizer=None, train_split=None, eval_split=None, eval_rows=None) -> Path | None:
    """Write OUTPUT/report.md; logs and returns None instead of failing the finished run."""
    out = Path(out)
    try:
        return _write(cfg, out, tokenizer, train_split, eval_split, eval_rows)
    except Exception as e:  # the model is saved already: a report problem must not fail the run
        log.warning(f"the run report could not be written: {type(e).__name__}: {e}")
        return None


def _write(cfg, out: Path, tokenizer, train_split, eval_split, eval_rows) -> Path:
    from chattune.evaluate import sample_prompts

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    source = eval_split if eval_split is not None else train_split
    prompts = []
    if source is not None and source.format != "text":
        prompts = sample_prompts(source.dataset.select(range(min(N_SAMPLES, len(source.dataset))))["messages"],
                                 N_SAMPLES)
    budget = sample_budget(tokenizer, prompts)
    baseline = None
    if getattr(cfg.train, "eval_baseline", True) and eval_rows is not None and tokenizer is not None:
        try:
            baseline = evaluate_baseline(cfg, tokenizer, eval_split, eval_rows, prompts, budget)
            results["baseline"] = {k: v for k, v in baseline.items() if k != "sample_replies"}
            results_path.write_text(json.dumps(results, indent=2, default=str))
            log.info(f"base model on the same evaluation tokens: loss {baseline['eval_loss']:.4f}")
        except Exception as e:
            log.warning(f"the base model could not be scored for the report: {e}")
    train, evals = read_metrics(out)
    plots = plot_curves(out, train, evals, baseline["eval_loss"] if baseline else None)

    final = results.get("eval") or {}
    lines = [f"# chattune run: {out.resolve().name}", ""]
    for alt, path in plots:
        lines += [f"![{alt}]({path})", ""]
    if not plots:
        lines += ["_No training metrics were logged, so there are no curves._", ""]
    data = ", ".join(f"`{s.dataset}` (split `{s.split}`)" for s in sources(cfg.data))
    summary = (f"Fine-tuned `{cfg.model.name}` on {data} for "
               f"{train[-1]['step'] if train else '?'} optimizer steps on {results.get('device', '?')} in "
               f"{results.get('precision', '?')}.")
    if final and baseline:
        summary += (f" Evaluation loss per assistant token: {baseline['eval_loss']:.4f} before, "
                    f"{final['eval_loss']:.4f} after training.")
    elif final:
        summary += f" Final evaluation loss per assistant token: {final['eval_loss']:.4f}."
    else:
        summary += " The run had no evaluation split (set --eval-split or --eval-fraction to measure held-out loss)."
    lines += [summary, "", "## Final metrics", ""] + _metrics_table(results, train, baseline)
    if baseline:
        lines += ["", "The base model is scored on the same evaluation tokens, with the same chat template and "
                      "added tokens, as the fine-tuned one."]
    if prompts:
        where = "held-out" if eval_split is not None else "training (this run has no evaluation split)"
        lines += ["", "## Sample exchanges", "",
                  f"The first {len(prompts)} {where} conversations, answered greedily (up to {budget} new "
                  "tokens) after the last reply was removed.", ""]
        lines += _sample_rows(out, prompts, baseline["sample_replies"] if baseline else None, budget)
    lines += ["", "## Data", ""] + _data_table(results, train_split, eval_split, out)
    config_text = (out / "chattune.yaml").read_text() if (out / "chattune.yaml").exists() else ""
    lines += ["", "## Configuration", "", "The resolved configuration (`chattune.yaml`; rerun with "
              "`chattune train --config chattune.yaml`):", "", "```yaml", config_text.rstrip(), "```", ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    log.info(f"report: {path}")
    return path

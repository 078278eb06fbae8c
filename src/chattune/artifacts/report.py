"""The run report: OUTPUT/report.md, what a person reads instead of the logs.

It opens with loss curves (PNG, drawn with matplotlib from metrics.jsonl), then the final metrics
(before/after when the base model was scored on the same held-out tokens), sample exchanges, data
statistics and the resolved config; the prose is templates/report.md.jinja. Written at the end of every
`chattune train`, after the model is saved: a failure here never costs the trained model, and is raised as
ReportError (one line, exit code 3) so that the run does not look complete.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from chattune.artifacts.render import metric_rows, read_json, render
from chattune.data.loading import sample_prompts
from chattune.data.mixture import sources
from chattune.errors import ChattuneError, ReportError
from chattune.evaluation.compare import score_baseline
from chattune.inference.generate import generate_replies
from chattune.model.load import load_chat_model, pick_device
from chattune.outputs import CONFIG_FILE, METRICS_FILE, PLOTS_DIR, REJECTED_FILE, REPORT_FILE, RESULTS_FILE
from chattune.training.early_stop import describe as describe_stopping

log = logging.getLogger("chattune")
N_SAMPLES = 3
SAMPLE_TOKENS = 64


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(training log records, evaluation records) from OUTPUT/metrics.jsonl."""
    path = out / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def markers(n_points: int) -> dict:
    """Dots on a line with few points: a line through one point draws nothing."""
    return {"marker": "o", "markersize": 4} if n_points < 30 else {}


def plot_curves(out: Path, train: list[dict], evals: list[dict], baseline_loss: float | None = None,
                loss_label: str = "mean loss per token") -> list[tuple]:
    """Write the plots; returns (alt text, relative path) for each one written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    (out / PLOTS_DIR).mkdir(exist_ok=True)
    written = []
    if train or evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", lw=1.5,
                    **markers(len(train)))
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="evaluation loss", lw=1.5)
        if baseline_loss is not None:
            ax.plot([0], [baseline_loss], "s", color="gray", label=f"base model, evaluation ({baseline_loss:.3f})")
        values = [r["loss"] for r in train] + [r["eval_loss"] for r in evals] + [baseline_loss or 0]
        positive = [v for v in values if v and v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # a random-init baseline would flatten the curves on a linear axis
        ax.set(xlabel="optimizer step", ylabel=loss_label, title="Loss")
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
            ax.plot(*zip(*points), lw=1.2, **markers(len(points)))
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.suptitle("Schedule and throughput")
        fig.tight_layout()
        fig.savefig(out / PLOTS_DIR / "training.png", dpi=110)
        plt.close(fig)
        written.append(("Learning rate, gradient norm and throughput", f"{PLOTS_DIR}/training.png"))
    return written


def sample_budget(tokenizer, prompts) -> int:
    """New tokens for the sample replies: room for twice the longest reference, at most SAMPLE_TOKENS,
    so short answers (the quickstart's sums) cost a few steps, not 64."""
    if tokenizer is None or not prompts:
        return SAMPLE_TOKENS
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in prompts)
    return max(16, min(SAMPLE_TOKENS, 2 * longest + 4))


def evaluate_baseline(cfg, tokenizer, eval_split, eval_rows, prompts, budget: int) -> dict:
    """Score the run's base model on the evaluation rows training scored, and answer the sample prompts
    with it: the 'before' of the report. Alignment is proven on a sample of 64 conversations."""
    kind = "text" if eval_split.format == "text" else "messages"
    b = score_baseline(cfg.model.name, tokenizer, eval_split.dataset, kind, eval_rows, cfg.data.max_length,
                       cfg.train.eval_batch_size or cfg.train.batch_size, pick_device(), seed=cfg.train.seed,
                       template_file=cfg.model.chat_template, prompts=prompts, sample_tokens=budget, check_rows=64)
    return {"model": b["model"], **{f"eval_{k}": b[k] for k in ("loss", "perplexity", "accuracy", "tokens")},
            "sample_replies": b["sample_replies"]}


def _samples(out: Path, prompts, base_replies, budget: int) -> list[dict]:
    model, tok = load_chat_model(str(out))
    # a held-out conversation longer than the context is cut from the left: the reply needs room
    replies = generate_replies(model, tok, [p for p, _ in prompts], budget, fit="left")
    del model
    gc.collect()
    return [{"role": prompt[-1]["role"], "prompt": prompt[-1]["content"], "reference": ref, "reply": r["reply"],
             "earlier": len(prompt) - 1, "cut": r["cut"], "base_reply": base_replies[i] if base_replies else None}
            for i, ((prompt, ref), r) in enumerate(zip(prompts, replies))]


def _data_rows(results: dict, train_split, eval_split) -> list[dict]:
    rows = []
    for key, split in (("train", train_split), ("eval", eval_split)):
        s = (results.get("data") or {}).get(key)
        if s:
            rows.append({"split": key, "name": split.name if split is not None else key, **s})
    return rows


def write_run_report(cfg, out, tokenizer=None, train_split=None, eval_split=None, eval_rows=None) -> Path:
    """Write OUTPUT/report.md. Called once the model is saved; a report that cannot be written raises
    ReportError naming the problem, so the run's exit code says so (the model stays complete)."""
    out = Path(out)
    try:
        return _write(cfg, out, tokenizer, train_split, eval_split, eval_rows)
    except Exception as e:  # any failure: the model is fine, the report is not, and the user must know
        first = str(e).splitlines()[0] if str(e).strip() else ""
        raise ReportError(f"the model is saved in {out}, but its report ({out / REPORT_FILE}) could not be written: "
                          f"{type(e).__name__}: {first}") from e


def _write(cfg, out: Path, tokenizer, train_split, eval_split, eval_rows) -> Path:
    results_path = out / RESULTS_FILE
    try:
        results, results_ok = read_json(results_path), True
    except ChattuneError as e:  # the report still shows curves, samples and config; results.json is left as found
        log.warning(f"{e}; the report leaves out the final metrics")
        results, results_ok = {}, False
    source = eval_split if eval_split is not None else train_split
    prompts = []
    if source is not None and source.format != "text":
        prompts = sample_prompts(source.dataset, N_SAMPLES)
    budget = sample_budget(tokenizer, prompts)
    baseline = None
    if getattr(cfg.train, "eval_baseline", True) and eval_rows is not None and tokenizer is not None:
        try:
            baseline = evaluate_baseline(cfg, tokenizer, eval_split, eval_rows, prompts, budget)
            results["baseline"] = {k: v for k, v in baseline.items() if k != "sample_replies"}
            if results_ok:
                results_path.write_text(json.dumps(results, indent=2, default=str))
            log.info(f"base model on the same evaluation tokens: loss {baseline['eval_loss']:.4f}")
        except Exception as e:
            log.warning(f"the base model could not be scored for the report: {e}")
    train, evals = read_metrics(out)
    plots = plot_curves(out, train, evals, baseline["eval_loss"] if baseline else None)
    final = results.get("eval") or {}
    t = results.get("train") or {}
    # the trainer's final step; the last logged step can be earlier (a run of 6 steps logged every 5)
    steps = t.get("global_step", train[-1]["step"] if train else None)
    extra = (("final training loss", train[-1]["loss"] if train else None),
             ("optimizer steps", steps),
             ("training time (s)", t.get("train_runtime")), ("mean training loss", t.get("train_loss")))
    rejected = out / REJECTED_FILE
    text = render(
        "report.md.jinja", name=out.resolve().name, plots=plots, model=cfg.model.name,
        data=", ".join(f"`{s.dataset}` (split `{s.split}`)" for s in sources(cfg.data)),
        steps=steps if steps is not None else "?", device=results.get("device", "?"),
        precision=results.get("precision", "?"), final=final, baseline=baseline,
        stopping=describe_stopping(results.get("stopping")),
        metrics=metric_rows(final, baseline, extra),
        samples=_samples(out, prompts, baseline["sample_replies"] if baseline else None, budget) if prompts else [],
        samples_from="held-out" if eval_split is not None else "training (this run has no evaluation split)",
        sample_tokens=budget, data_rows=_data_rows(results, train_split, eval_split),
        rejected=sum(1 for _ in open(rejected)) if rejected.exists() else 0,
        format=train_split.format if train_split is not None else None, max_length=results.get("max_length"),
        config_text=(out / CONFIG_FILE).read_text().rstrip() if (out / CONFIG_FILE).exists() else "")
    path = out / REPORT_FILE
    path.write_text(text)
    log.info(f"report: {path}")
    return path

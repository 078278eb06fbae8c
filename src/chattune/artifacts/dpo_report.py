"""What a `chattune dpo` run leaves for a person: OUTPUT/report.md (the DPO loss and TRL's rewards/* curves,
held-out preference accuracy before and after with sample pairs, data statistics, the config) and OUTPUT/README.md
(the model card, as `chattune push` would upload it). Curves are drawn from metrics.jsonl; numbers come from
results.json. Like the SFT report, a failure here never costs the saved model: it raises ReportError."""

from __future__ import annotations

import logging
from pathlib import Path

from chattune.artifacts.card import build_card
from chattune.artifacts.render import preference_rows, read_json, render
from chattune.artifacts.report import _samples, markers, plot_curves, read_metrics, sample_budget
from chattune.data.mixture import sources
from chattune.errors import ReportError
from chattune.outputs import CONFIG_FILE, METRICS_FILE, PLOTS_DIR, REJECTED_FILE, REPORT_FILE, RESULTS_FILE

log = logging.getLogger("chattune")
REWARDS = (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margin"),
           ("rewards/accuracies", "accuracy"))


def plot_rewards(out: Path, records: list[dict]) -> list[tuple]:
    """TRL's implicit rewards (beta x log-ratio to the reference), training and evaluation, in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "rewards/chosen" in r]
    evals = [r for r in records if "eval_rewards/chosen" in r]
    if not train and not evals:
        return []
    (out / PLOTS_DIR).mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    panels = ((axes[0], ("rewards/chosen", "rewards/rejected"), "reward"), (axes[1], ("rewards/margins",), "margin"),
              (axes[2], ("rewards/accuracies",), "accuracy"))
    for ax, keys, label in panels:
        for key in keys:
            name = key.split("/")[1]
            if train:
                ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1.3, label=f"train {name}",
                        **markers(len(train)))
            if evals:
                ax.plot([r["step"] for r in evals], [r[f"eval_{key}"] for r in evals], "o--", lw=1.3,
                        label=f"eval {name}")
        ax.set(xlabel="optimizer step", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Implicit rewards (beta x log-ratio to the reference model)")
    fig.tight_layout()
    fig.savefig(out / PLOTS_DIR / "rewards.png", dpi=110)
    plt.close(fig)
    return [("Rewards of chosen and rejected replies, margin and accuracy", f"{PLOTS_DIR}/rewards.png")]


def write_dpo_report(cfg, out, tokenizer=None, train_split=None, eval_split=None) -> Path:
    out = Path(out)
    try:
        return _write(cfg, out, tokenizer, train_split, eval_split)
    except Exception as e:  # the model is fine, the report is not, and the user must know
        first = str(e).splitlines()[0] if str(e).strip() else ""
        raise ReportError(f"the model is saved in {out}, but its report ({out / REPORT_FILE}) could not be written: "
                          f"{type(e).__name__}: {first}") from e


def _write(cfg, out: Path, tokenizer, train_split, eval_split) -> Path:
    import json

    results = read_json(out / RESULTS_FILE)
    path = out / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    train, evals = read_metrics(out)
    plots = plot_curves(out, train, evals, loss_label="DPO loss") + plot_rewards(out, records)
    samples = (results.get("preference") or {}).get("samples") or []
    if samples:  # the tuned model's own greedy answer to each sample prompt
        prompts = [(s["prompt"], s["chosen"]) for s in samples]
        budget = sample_budget(tokenizer, prompts)
        for s, r in zip(samples, _samples(out, prompts, None, budget)):
            s["reply"], s["last"] = r["reply"], s["prompt"][-1]["content"]
    stats = results.get("data") or {}
    text = render(
        "dpo_report.md.jinja", name=out.resolve().name, plots=plots, model=cfg.model.name,
        data=", ".join(f"`{s.dataset}` (split `{s.split}`)" for s in sources(cfg.data)),
        eval_name=eval_split.name if eval_split is not None else None, steps=train[-1]["step"] if train else "?",
        device=results.get("device", "?"), precision=results.get("precision", "?"), dpo=results.get("dpo") or {},
        lr=cfg.train.lr, epochs=cfg.train.epochs, preference=results.get("preference"), rows=preference_rows(results),
        samples=samples, data_rows=[(k, v) for k, v in stats.items() if v], max_length=results.get("max_length"),
        rejected=_count_lines(out / REJECTED_FILE),
        config_text=(out / CONFIG_FILE).read_text().rstrip() if (out / CONFIG_FILE).exists() else "")
    report = out / REPORT_FILE
    report.write_text(text)
    log.info(f"report: {report}")
    return report


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def write_dpo_card(out: Path) -> Path:
    """OUTPUT/README.md: the model card `chattune push` would upload (it rewrites it then, with the repo id)."""
    path = Path(out) / "README.md"
    path.write_text(build_card(Path(out), Path(out).resolve().name))
    return path

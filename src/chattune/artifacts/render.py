"""Markdown from Jinja templates (templates/*.md.jinja): Python builds the values, a template file holds the
prose. Shared by the run report and the model card."""

from __future__ import annotations

import html
import json
import re
from functools import cache
from importlib import resources
from pathlib import Path

from chattune.errors import ChattuneError


def cell(text, limit: int = 400) -> str:
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


EVAL_METRICS = (("evaluation loss (per assistant token)", "eval_loss", False), ("perplexity", "eval_perplexity", False),
                ("next-token accuracy", "eval_accuracy", True), ("evaluation tokens", "eval_tokens", False))


def metric_rows(final: dict, before: dict | None, extra: tuple = ()) -> list[tuple[str, str, str]]:
    """(label, base model, fine-tuned) for each evaluation metric the run has, then (label, value) extras."""
    rows = [(label, fmt_number((before or {}).get(key), pct), fmt_number(final[key], pct))
            for label, key, pct in EVAL_METRICS if key in final]
    return rows + [(label, "-", fmt_number(v)) for label, v in extra if v is not None]


@cache
def _template(name: str):
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
                             undefined=jinja2.StrictUndefined)
    env.filters["cell"] = cell
    env.filters["number"] = fmt_number
    return env.from_string(resources.files("chattune.artifacts").joinpath("templates").joinpath(name).read_text())


def render(template: str, **values) -> str:
    return _template(template).render(**values)


def read_json(path: Path) -> dict:
    """A run's JSON file (results.json, eval.json) for the report and the card: {} when absent; one clear line
    (ChattuneError) when it is truncated or is not a JSON object, never a JSONDecodeError."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ChattuneError(f"{path} is not readable JSON{where}: it was cut short or damaged; restore it, or "
                            "delete it to go without the metrics it holds") from None
    if not isinstance(data, dict):
        raise ChattuneError(f"{path} is not readable JSON: it holds a {type(data).__name__}, not an object; restore "
                            "it, or delete it to go without the metrics it holds")
    return data


def preference_rows(results: dict) -> list[tuple[str, str, str]]:
    """(metric, starting model, tuned) rows for the report and the card."""
    pref = results.get("preference") or {}
    before, after = pref.get("before") or {}, pref.get("after") or {}
    final = results.get("eval") or {}
    rows = []
    if after:
        rows += [("preference accuracy (chosen more likely than rejected)", fmt_number(before.get("accuracy"), True),
                  fmt_number(after.get("accuracy"), True)),
                 ("mean log-prob margin, chosen - rejected", fmt_number(before.get("margin")),
                  fmt_number(after.get("margin"))),
                 ("implicit-reward accuracy vs the starting model", "-",
                  fmt_number(after.get("reward_accuracy"), True))]
    for label, key, pct in (("DPO evaluation loss", "eval_loss", False),
                            ("evaluation rewards/accuracies", "eval_rewards/accuracies", True),
                            ("evaluation rewards/margins", "eval_rewards/margins", False)):
        if key in final:
            rows.append((label, "-", fmt_number(final[key], pct)))
    return rows

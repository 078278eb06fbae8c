"""`chattune data validate` and `inspect` on preference pairs: pair counts, problems with file and row, token
lengths of prompt / chosen / rejected, and how many pairs --max-length truncates."""

from __future__ import annotations

import json

from chattune.cli import main
from chattune.data.preferences import load_preferences, tokenize_pairs


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_counts_pairs_of_each_split(capsys, ultrafeedback_dir):
    code, out, _ = _run(capsys, "data", "validate", "--dataset", ultrafeedback_dir)
    assert code == 0
    assert out.splitlines() == [f"{ultrafeedback_dir} [train_prefs]: 64 valid pairs, format preference",
                                f"{ultrafeedback_dir} [test_prefs]: 16 valid pairs, format preference",
                                "no problems found"]


def test_validate_reports_bad_pairs_with_file_and_line(capsys, tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    path.write_text("\n".join(json.dumps(r) for r in [good, {**good, "rejected": "hello"}, good]) + "\n")
    code, out, _ = _run(capsys, "data", "validate", "--dataset", path, "--json")
    r = json.loads(out)
    assert code == 2 and r["problems"] == {"identical chosen and rejected": 1}
    assert r["first"][0]["where"] == f"{path} line 2"


def test_inspect_lengths_and_truncation_match_dpo_tokenization(capsys, model_dir, ultrafeedback_dir):
    code, out, _ = _run(capsys, "data", "inspect", "--model", model_dir, "--dataset", ultrafeedback_dir,
                        "--max-length", 30, "--json")
    r = json.loads(out)
    assert code == 0 and r["pairs"] == 64 and r["format"] == "preference" and r["sampled"] == 64
    from chattune.data.template import prepare_tokenizer
    from chattune.model.hub import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    prepare_tokenizer(tok)
    pairs = load_preferences(str(ultrafeedback_dir), "train_prefs").dataset
    _, stats = tokenize_pairs(tok, pairs, max_length=30)
    t = r["truncation"]
    assert (t["prompts_cut"], t["prompt_tokens_dropped"], t["replies_cut"]) == \
        (stats.prompts_cut, stats.prompt_tokens_dropped, stats.replies_cut)
    _, full = tokenize_pairs(tok, pairs)
    assert r["tokens"]["chosen"]["mean"] == round(full.chosen_tokens / 64, 1)
    assert r["tokens"]["prompt"]["max"] >= r["tokens"]["prompt"]["p50"] > 0
    code, text, _ = _run(capsys, "data", "inspect", "--model", model_dir, "--dataset", ultrafeedback_dir,
                         "--max-length", 30)
    assert f"--max-length 30: truncates {t['pairs_cut']} pairs" in text and "  rejected mean" in text

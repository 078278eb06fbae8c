"""`chattune generate`: JSONL prompts in, one reply row per input row out, batched with left padding,
reproducible with a seed; bad rows are named by line."""

from __future__ import annotations

import json

from chattune.cli import main
from chattune.commands.generate import run_generate
from chattune.inference.generate import generate_replies
from chattune.model.load import load_chat_model

ROWS = [
    {"id": "a", "prompt": "What is 12 + 34?"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 10 and 20."}]},
    {"messages": [{"role": "user", "content": "What is 11 + 11?"}, {"role": "assistant", "content": "11 + 11 = 22."},
                  {"role": "user", "content": "And 12 + 12?"}]},
    {"id": 7, "prompt": "How much is 45 plus 17?"},
    {"prompt": "Compute 33 + 44."},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_row_out_per_row_in_keeping_order_and_ids(trained_dir, tmp_path, capsys):
    src, dst = _write(tmp_path / "prompts.jsonl", ROWS), tmp_path / "answers.jsonl"
    assert main(["generate", str(trained_dir), "--input", str(src), "--output", str(dst), "--max-new-tokens", "6",
                 "--batch-size", "2"]) == 0
    out = _read(dst)
    assert [r["index"] for r in out] == list(range(len(ROWS)))
    assert out[0]["id"] == "a" and out[3]["id"] == 7 and "id" not in out[1]
    for r in out:
        assert isinstance(r["reply"], str) and 0 <= r["tokens"] <= 6
        assert r["finish_reason"] in ("stop", "length")
        assert r["finish_reason"] == "stop" or r["tokens"] == 6
    assert f"{len(ROWS)} replies" in capsys.readouterr().out


def test_left_padded_batches_give_the_replies_of_single_prompts(trained_dir):
    model, tok = load_chat_model(str(trained_dir), "cpu")
    convs = [[{"role": "user", "content": r["prompt"]}] if "prompt" in r else r["messages"] for r in ROWS]
    batched = generate_replies(model, tok, convs, max_new_tokens=8, batch_size=len(convs))
    single = [generate_replies(model, tok, [c], max_new_tokens=8)[0] for c in convs]
    assert batched == single
    assert tok.padding_side == "right"  # restored after generation


def test_seeded_sampling_is_reproducible(trained_dir, tmp_path):
    src = _write(tmp_path / "p.jsonl", ROWS)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, batch_size=2, device="cpu")
    run_generate(str(trained_dir), str(src), str(tmp_path / "a.jsonl"), seed=3, **kw)
    run_generate(str(trained_dir), str(src), str(tmp_path / "b.jsonl"), seed=3, **kw)
    assert _read(tmp_path / "a.jsonl") == _read(tmp_path / "b.jsonl")


def test_bad_rows_are_named_by_line(trained_dir, tmp_path, capsys):
    cases = [
        ('{"prompt": "hi"}\nnot json\n', "line 2: not valid JSON"),
        ('{"question": "hi"}\n', "line 1: needs 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
         "line 1: the last message is from the assistant"),
        ('{"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}\n',
         "line 1: message 0: role 'assistant' cannot come at the start"),
        ("\n\n", "has no rows"),
    ]
    for text, expected in cases:
        src = tmp_path / "bad.jsonl"
        src.write_text(text)
        code = main(["generate", str(trained_dir), "--input", str(src), "--output", str(tmp_path / "o.jsonl")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_output_equal_to_input_is_refused_before_anything_is_written(trained_dir, tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.jsonl", ROWS[:1])
    before = prompts.read_text()
    same = tmp_path / "." / "sub" / ".." / "prompts.jsonl"  # another spelling of the same path
    (tmp_path / "sub").mkdir()
    assert main(["generate", str(trained_dir), "--input", str(prompts), "--output", str(same)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "--input" in err and len(err.strip().splitlines()) == 1
    assert prompts.read_text() == before

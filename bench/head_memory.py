"""Peak memory of the LM head and its cross-entropy (forward + backward) as the vocabulary grows.

    python bench/head_memory.py [--tokens 2048] [--hidden 256]

Each case runs in a fresh process and reports its peak RSS above the inputs it was given (hidden
states, head weight and its gradient): the full-logits cross-entropy that transformers computes
(logits, log-probabilities and their gradient for every position) against chattune's selective head
(loss.linear_cross_entropy_sum: logits for a fixed-size block of rows at a time).
Results: bench/results/head_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCABS = (32_768, 65_536, 131_072)


def child(kind: str, vocab: int, tokens: int, hidden: int) -> None:
    import torch

    from chattune.model.loss import linear_cross_entropy_sum

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (tokens,))
    w.grad = torch.zeros_like(w)  # the gradient buffers exist in both cases: count them in the baseline
    h.grad = torch.zeros_like(h)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "full":
        loss = torch.nn.functional.cross_entropy((h @ w.t()).float(), y, reduction="sum")
    else:
        loss = linear_cross_entropy_sum(h, w, None, y)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "vocab": vocab, "tokens": tokens, "head_peak_mib": (peak - base) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args()
    rows = []
    for vocab in VOCABS:
        for kind in ("full", "selective"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(vocab), str(args.tokens),
                                  str(args.hidden)], capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["| vocabulary | full-logits cross-entropy, MiB | chattune selective head, MiB |", "| --- | --- | --- |"]
    for vocab in VOCABS:
        full, sel = (next(r["head_peak_mib"] for r in rows if r["vocab"] == vocab and r["kind"] == k)
                     for k in ("full", "selective"))
        lines.append(f"| {vocab} | {full:.0f} | {sel:.0f} |")
    text = f"{args.tokens} tokens, hidden size {args.hidden}; peak RSS above the inputs and gradient buffers\n\n" + \
        "\n".join(lines)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "head_memory.json").write_text(json.dumps(rows, indent=2))
    (args.results / "head_memory.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()

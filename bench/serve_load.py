"""Load test for `chattune serve`: N concurrent clients x M requests each, streamed, on loopback.

Reports requests/s, generated tokens/s, p50/p95 latency and time to first token (TTFT) for
  concurrent   N clients at once against the batching server (--max-batch-size N),
  in_a_row     the same N x M requests one after another against the same server,
  baseline     N clients at once against a server that answers one request at a time (--max-batch-size 1),
and the done-when ratio: concurrent wall time / in-a-row wall time (target <= ~0.6 on a 2-core CPU), plus the
same ratio of the server's CPU time, which other jobs on a shared machine disturb less. Runs are interleaved
and repeated (--repeats); medians are reported because a shared machine is noisy.

  python bench/serve_load.py --build-demo-model /tmp/gpt2-124m-shaped   # random GPT-2-small-shaped model, offline
  python bench/serve_load.py --model /tmp/gpt2-124m-shaped --out bench/results/serve_load-124m.json
  python bench/serve_load.py --url http://127.0.0.1:8000 --clients 8    # only the concurrent run, on a running server

Each server is `python -m chattune serve MODEL --port 0` started by this script (its log in --log-dir).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

SERVE_CMD = [sys.executable, "-m", "chattune", "serve"]
PROMPTS = [
    "What is 12 + 34?", "Please add 57 and 21, then explain each step of the addition in a few words.",
    "Hello!", "Compute 33 + 44.", "Write one sentence about the sea, the sky and the wind on a cold morning.",
    "What do you get when you add 18 and 27?", "Say something kind.", "How much is 45 plus 17? Answer briefly.",
]


def one_request(url: str, model: str, prompt: str, max_tokens: int, api_key: str | None) -> dict:
    """One streamed chat completion: latency, time to first token, generated tokens."""
    u = urlparse(url)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    start = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, tokens = None, 0
    for line in r:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - start
    conn.close()
    latency = time.perf_counter() - start
    return {"latency": latency, "ttft": latency if ttft is None else ttft, "tokens": tokens}


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int, api_key: str | None = None) -> dict:
    """`clients` threads, each sending `requests` requests one after another, all starting together."""
    results, errors = [], []
    barrier = threading.Barrier(clients)

    def client(c: int):
        barrier.wait()
        for k in range(requests):
            try:
                results.append(one_request(url, model, PROMPTS[(c * requests + k) % len(PROMPTS)], max_tokens, api_key))
            except Exception as e:  # counted and reported, never silently dropped
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summarize(results, wall, errors)


def summarize(results: list[dict], wall: float, errors: list[str]) -> dict:
    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else None

    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "errors": errors, "wall_s": wall, "tokens": tokens,
            "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95)}


def start_server(model: str, max_batch_size: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = SERVE_CMD + [model, "--port", "0", "--served-model-name", "bench", "--max-batch-size", str(max_batch_size)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r" on (http://127\.0\.0\.1:\d+) ", log_path.read_text())
        if m:
            try:
                urllib.request.urlopen(m.group(1) + "/health", timeout=5)
                return proc, m.group(1)
            except OSError:
                pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start; see {log_path}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(60)


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (its own figures, so they stay consistent with each other)."""
    middle = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return middle | {"wall_s_all": [round(r["wall_s"], 3) for r in runs]}


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (user + system, Linux /proc): the server's own work, which other jobs on a
    shared machine slow down far less than they slow its wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(proc: subprocess.Popen, url: str, clients: int, requests: int, max_tokens: int) -> dict:
    before = cpu_seconds(proc.pid)
    result = run_load(url, "bench", clients, requests, max_tokens)
    return result | {"server_cpu_s": cpu_seconds(proc.pid) - before}


def compare(args) -> dict:
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    runs = {"concurrent": [], "in_a_row": [], "baseline": []}
    n = args.clients * args.requests
    for rep in range(args.repeats):  # interleaved, so a slow phase of the machine hits every scenario
        proc, url = start_server(args.model, args.clients, logs / "batched.log")
        try:
            run_load(url, "bench", 2, 1, 4)  # warm-up
            # the order alternates (ABBA...), so a machine getting slower or faster favours neither
            for name in ("concurrent", "in_a_row") if rep % 2 == 0 else ("in_a_row", "concurrent"):
                clients, requests = (args.clients, args.requests) if name == "concurrent" else (1, n)
                runs[name].append(measured(proc, url, clients, requests, args.max_tokens))
        finally:
            stop_server(proc)
        proc, url = start_server(args.model, 1, logs / "baseline.log")
        try:
            run_load(url, "bench", 2, 1, 4)
            runs["baseline"].append(measured(proc, url, args.clients, args.requests, args.max_tokens))
        finally:
            stop_server(proc)
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f}s" for k, v in runs.items()),
              file=sys.stderr)
    out = {k: median_run(v) for k, v in runs.items()}
    for key, label in (("wall_s", "ratio_concurrent_over_in_a_row"),
                       ("server_cpu_s", "cpu_ratio_concurrent_over_in_a_row")):
        ratios = [c[key] / s[key] for c, s in zip(runs["concurrent"], runs["in_a_row"])]
        out[label] = {"median": statistics.median(ratios), "all": [round(r, 3) for r in ratios]}
    return out


def table(results: dict) -> str:
    rows = ["| scenario | requests | wall s | req/s | gen tok/s | p50 latency s | p95 latency s | p50 TTFT s "
            "| p95 TTFT s | server CPU s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        if isinstance(r, dict) and "wall_s" in r:
            cpu = f"{r['server_cpu_s']:.1f}" if "server_cpu_s" in r else "-"
            rows.append(f"| {name} | {r['requests']} | {r['wall_s']:.2f} | {r['requests_per_s']:.2f} | "
                        f"{r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                        f"{r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} | {cpu} |")
    for key, what in (("ratio_concurrent_over_in_a_row", "wall time"),
                      ("cpu_ratio_concurrent_over_in_a_row", "server CPU time")):
        if key in results:
            ratio = results[key]
            rows.append(f"\nconcurrent / in-a-row {what}: **{ratio['median']:.2f}** (median; runs {ratio['all']})")
    return "\n".join(rows)


def build_demo_model(directory: str) -> None:
    """A randomly initialised model shaped like gpt2 (12 layers, 768 wide, 1024 positions), built offline with
    chattune's own builders; its vocabulary is the small demo tokenizer's, so its LM head is smaller than gpt2's."""
    from chattune.demo import addition, assets

    splits = addition.addition_splits(n_train=400, n_test=10, seed=0)
    tok = assets.train_tokenizer(list(assets.texts_of(splits)), directory)
    assets.tiny_gpt2(len(tok), directory, n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    print(f"built {directory} (vocabulary {len(tok)})")


def cpu_name() -> str:
    """The CPU model (Linux), for the results file: a shared 2-core machine and a workstation differ a lot."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory: start a batching and a one-at-a-time server and compare")
    p.add_argument("--url", help="a running server: run only the concurrent load against it")
    p.add_argument("--api-key", default=os.environ.get("CHATTUNE_API_KEY"),
                   help="for --url (default: $CHATTUNE_API_KEY)")
    p.add_argument("--build-demo-model", metavar="DIR", help="build the GPT-2-small-shaped random model and exit")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=1, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--log-dir", default="serve_load_logs")
    p.add_argument("--out", help="write the results as JSON here (a .md table next to it)")
    args = p.parse_args(argv)
    if args.build_demo_model:
        build_demo_model(args.build_demo_model)
        return 0
    if bool(args.model) == bool(args.url):
        p.error("give exactly one of --model and --url")
    load_before = os.getloadavg()
    if args.url:
        name = json.loads(urllib.request.urlopen(urllib.request.Request(
            args.url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        )).read())["data"][0]["id"]
        results = {"concurrent": run_load(args.url, name, args.clients, args.requests, args.max_tokens, args.api_key)}
    else:
        results = compare(args)
    results["setup"] = {"clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                        "repeats": args.repeats, "model": args.model or args.url, "cpus": os.cpu_count(),
                        "cpu": cpu_name(), "torch": version("torch"), "transformers": version("transformers"),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),  # the servers' torch threads
                        "load_average_before": load_before, "load_average_after": os.getloadavg(),
                        "date": time.strftime("%Y-%m-%d %H:%M")}
    md = table(results)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

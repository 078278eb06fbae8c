"""The DPO quickstart (`chattune quickstart --task dpo`) over several seeds: before -> after DPO, mean and standard
error across seeds, with wall-clock and process CPU time (the host may be loaded: CPU time is the comparable one).

    OMP_NUM_THREADS=1 python bench/dpo_demo.py --seeds 0 1 2 [--jobs 3 --max-steps 900 --dpo-steps 60] --out DIR

Each seed draws its own SFT conversations (which replies decline), held-out questions and preference pairs, and
its own DPO data order; --jobs runs that many seeds at once, each in its own process. Writes
bench/results/NAME.json (and .md); the runs themselves go to DIR/seed-N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = {"preference accuracy": ("before", "after"), "exact match": ("exact_match",), "declined": ("declined",)}


def pick(report: dict, name: str) -> tuple[float, float]:
    if name == "preference accuracy":
        return report["before"], report["after"]
    part = report[METRICS[name][0]]
    return part["before"], part["after"]


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan"))


def one_seed(job) -> dict:
    seed, out, max_steps, dpo_steps = job
    from chattune.commands.quickstart import run_dpo_quickstart

    load_before = os.getloadavg()[0]
    r = run_dpo_quickstart(str(Path(out) / f"seed-{seed}"), max_steps=max_steps, dpo_steps=dpo_steps, seed=seed)
    return {"seed": seed, **{k: pick(r, k) for k in METRICS}, "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
            "load_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "by_phrasing": r["by_phrasing"], "sft_exact_match": [r["sft"]["before"], r["sft"]["after"]]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--dpo-steps", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/dpo-demo")
    p.add_argument("--name", default="dpo_demo")
    a = p.parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(one_seed, [(seed, a.out, a.max_steps, a.dpo_steps) for seed in a.seeds]))
    for r in runs:
        print(json.dumps(r), flush=True)
    summary = {}
    for k in METRICS:
        before, after = mean_se([x[k][0] for x in runs]), mean_se([x[k][1] for x in runs])
        gain = mean_se([x[k][1] - x[k][0] for x in runs])
        summary[k] = {"before": before, "after": after, "change": gain}
    import torch

    result = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/dpo_demo.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch "
                         f"{torch.__version__}", "n_pairs": 200, "n_sums": 200, "runs": runs,
              "summary (mean, standard error over seeds)": summary}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# {a.name}: `chattune quickstart --task dpo`, {len(runs)} seeds", "",
             f"`{result['command']}` on {result['machine']}.", "",
             "| seed | preference accuracy | exact match | declined | wall s | CPU s | load |",
             "| ---: | --- | --- | --- | ---: | ---: | --- |"]
    for x in runs:
        cells = " | ".join(f"{x[k][0]:.1%} -> {x[k][1]:.1%}" for k in METRICS)
        lines.append(f"| {x['seed']} | {cells} | {x['seconds']:.0f} | {x['cpu_seconds']:.0f} | "
                     f"{x['load_1min'][0]}-{x['load_1min'][1]} |")
    cells = " | ".join(f"{summary[k]['before'][0]:.1%} ± {summary[k]['before'][1]:.1%} -> "
                       f"{summary[k]['after'][0]:.1%} ± {summary[k]['after'][1]:.1%}" for k in METRICS)
    lines += [f"| mean ± s.e. | {cells} | | | |", ""]
    (RESULTS / f"{a.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()

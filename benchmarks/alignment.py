"""poet-mlx alignment benchmark: the real-model demo's pipeline at a size that gives narrower intervals.

    python benchmarks/alignment.py                         # 2 seeds, DPO and SimPO, each +/- POET (hours on 2 cores)
    python benchmarks/alignment.py --seeds 0 --losses dpo  # one seed, DPO and DPO+POET
    python benchmarks/alignment.py --report benchmarks/out/alignment.json   # the tables again, no running
    python benchmarks/alignment.py --report benchmarks/out/alignment-work  # the seeds finished so far

For each seed, `poet_mlx.demo.real.run_real_demo` builds its own prompts (disjoint train and held-out base
tasks), samples the base model's replies, makes on-policy pairs, trains every loss with and without POET from
the same start, and samples and judges the held-out replies again with the same seeds. Stages already done in
--work are reused, so an interrupted benchmark continues. The seeds' replies are pooled: rates with Wilson 95%
intervals (replies of one prompt are not independent, so these intervals are somewhat optimistic), and the
per-seed rates beside them, so the spread between seeds is visible. Prints a markdown table (the README's) and
writes every number to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import poet_mlx  # noqa: E402,F401  (first: OpenBLAS for MLX's CPU matmuls)

ROWS = (("all_met", "all instructions met"), ("opening", "opening-decided"), ("end", "end-decided"),
        ("whole", "whole-reply"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="benchmarks/out/alignment-work", help="Folder of the runs (reused).")
    p.add_argument("--out", default="benchmarks/out/alignment.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--losses", nargs="+", default=["dpo", "simpo"])
    p.add_argument("--train-prompts", type=int, default=192)
    p.add_argument("--heldout-prompts", type=int, default=160)
    p.add_argument("--report", metavar="JSON_OR_WORK",
                   help="Only print the tables: of an earlier run's JSON, or of the finished seeds in a --work folder.")
    return p.parse_args(argv)


def pooled(results: list[dict], label: str) -> dict:
    """One model's numbers over every seed: pooled counts with Wilson intervals, and each seed's rate."""
    from poet_mlx.analysis.generations import wilson_interval

    def held(res):
        return res["base"] if label == "start" else next(r["heldout"] for r in res["runs"] if r["label"] == label)

    out = {}
    for key, _ in ROWS:
        parts = [(held(r)["all_met"] if key == "all_met" else held(r)["by"].get(key)) for r in results]
        parts = [p for p in parts if p and p["n"]]
        ok, n = sum(p["rate"] * p["n"] for p in parts), sum(p["n"] for p in parts)
        low, high = wilson_interval(ok, n)
        out[key] = {"rate": ok / n if n else None, "low": low, "high": high, "n": n,
                    "per_seed": [p["rate"] for p in parts]}
    out["mean_tokens"] = sum(held(r)["mean_tokens"] for r in results) / len(results)
    out["finished"] = sum(held(r)["finished"] for r in results) / len(results)
    if label != "start":
        curves = [next(r for r in res["runs"] if r["label"] == label).get("curve") for res in results]
        curves = [c for c in curves if c]
        pairs = sum(c["full"]["pairs"] for c in curves)
        out["prefix_pairs"] = pairs
        out["accuracy_full"] = sum(c["full"]["accuracy"] * c["full"]["pairs"] for c in curves) / pairs if pairs else None
        for i, k in enumerate(curves[0]["k"] if curves else []):
            n = sum(c["pairs"][i] for c in curves)
            if n:
                out[f"accuracy_k{k}"] = sum((c["accuracy"][i] or 0) * c["pairs"][i] for c in curves) / n
    return out


def table(summary: dict) -> str:
    """The markdown table of the README."""
    labels = list(summary["models"])
    head = "| held-out replies | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
    lines = []
    for key, name in ROWS:
        cells = []
        for label in labels:
            m = summary["models"][label][key]
            seeds = "/".join(f"{100 * x:.0f}" for x in m["per_seed"])
            cells.append(f"{100 * m['rate']:.1f}% [{100 * m['low']:.0f}-{100 * m['high']:.0f}] ({seeds})"
                         if m["rate"] is not None else "-")
        n = summary["models"][labels[0]][key]["n"]
        lines.append(f"| {name} (n={n}) | " + " | ".join(cells) + " |")
    lines.append("| mean reply length, tokens | " + " | ".join(f"{summary['models'][m]['mean_tokens']:.0f}" for m in labels)
                 + " |")
    lines.append("| replies that end | " + " | ".join(f"{100 * summary['models'][m]['finished']:.0f}%" for m in labels)
                 + " |")
    for key, name in (("accuracy_full", "reward accuracy, held-out pairs"), ("accuracy_k1", "... first token"),
                      ("accuracy_k4", "... first 4 tokens"), ("accuracy_k16", "... first 16 tokens")):
        cells = [summary["models"][m].get(key) for m in labels]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return head + "\n".join(lines)


def summarize(results: list[dict], args, seconds: float) -> dict:
    labels = ["start"] + [r["label"] for r in results[0]["runs"]]
    stages: dict = {}
    for res in results:
        for k, v in res["stage_seconds"].items():
            stages[k] = stages.get(k, 0.0) + v
    return {"seeds": args.seeds, "losses": args.losses, "spec": results[0]["spec"], "seconds": seconds,
            "stage_seconds": stages, "train_pairs": [r["train_pairs"]["pairs"] for r in results],
            "load_average": os.getloadavg(), "models": {m: pooled(results, m) for m in labels}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        path = Path(args.report)
        if path.is_dir():  # the seeds finished so far
            results = [json.loads(f.read_text()) for f in sorted(path.glob("seed-*/demo_results.json"))]
            results = [r for r in results if not r["interrupted"] and r["runs"]]
            if not results:
                raise SystemExit(f"no finished seed in {path}")
            args.seeds = [r["spec"]["seed"] for r in results]
            args.losses = list(results[0]["spec"]["losses"])
            summary = summarize(results, args, sum(r["seconds"] for r in results))
        else:
            summary = json.loads(path.read_text())
        print(table(summary))
        return 0
    from poet_mlx.cli.ui import PlainReporter
    from poet_mlx.demo.real import RealDemoSpec, run_real_demo

    tic, results = time.perf_counter(), []
    for seed in args.seeds:
        spec = replace(RealDemoSpec(), seed=seed, losses=tuple(args.losses), train_prompts=args.train_prompts,
                       heldout_prompts=args.heldout_prompts)
        print(f"# seed {seed}: {json.dumps(asdict(spec))}", flush=True)
        with PlainReporter() as reporter:
            results.append(run_real_demo(Path(args.work) / f"seed-{seed}", spec, reporter))
    summary = summarize(results, args, time.perf_counter() - tic)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(table(summary))
    print(f"\n{summary['seconds']:.0f} s; per stage: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items())
          + f"; train pairs per seed {summary['train_pairs']}; load average {summary['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

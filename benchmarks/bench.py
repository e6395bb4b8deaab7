"""poet-mlx benchmark: speed and memory of preference training, before/after each design decision, and side by
side with mlx-lm-lora when it is installed.

    python benchmarks/bench.py            # everything (~12 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick    # tiny model only (~1-2 minutes)
    python benchmarks/bench.py --sections models peer --out results.json
    python benchmarks/bench.py --setup-peer   # installs mlx-lm-lora 5.10.2 into benchmarks/.peer-venv and
                                              # unsloth-zoo 2026.10.9 into benchmarks/.peer-venv-unsloth
    python benchmarks/bench.py --real [--real-plan medium]  # SmolLM2-135M-Instruct side by side with both
                                                  # peers (full: over an hour on 2 cores; medium ~23 min;
                                                  # quick, also --quick, ~15 min; benchmarks/real.py)

Prints one table per section and writes every number to a JSON file (default benchmarks/out/bench.json).
Models and data are generated in code (benchmarks/workloads.py) and cached in --work.
Timings on a shared machine are noisy: the load average is recorded with every measurement; compare ratios
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import sections  # noqa: E402

ALL = ("blas", "models", "peer", "variants", "lossmem")
PEER_PIN = ["mlx-lm-lora==5.10.2", "mlx[cpu]>=0.32,<0.33", "mlx-lm>=0.32,<0.33", "scipy-openblas32"]


def setup_peer() -> int:
    venv = sections.ROOT / "benchmarks" / ".peer-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = PEER_PIN if sys.platform.startswith("linux") else [p.replace("mlx[cpu]", "mlx") for p in PEER_PIN]
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *pins], check=True)
    print(f"mlx-lm-lora installed in {venv}; bench.py finds it there")
    from benchmarks import real

    print(f"unsloth-zoo installed in {real.setup_unsloth()} (--no-deps; MLX, mlx-lm and OpenBLAS beside it)")
    return 0


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("mlx", "mlx-lm", "scipy-openblas32", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"platform": platform.platform(), "cpu": sections.cpu_name(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "versions": versions}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model only, few steps (~1-2 minutes)")
    p.add_argument("--sections", nargs="+", choices=ALL, default=list(ALL))
    p.add_argument("--out", default=str(sections.ROOT / "benchmarks" / "out" / "bench.json"), help="JSON results file")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "poet-mlx" / "bench"),
                   help="cache of generated models/data and scratch runs")
    p.add_argument("--peer-python", help="Python of a venv with mlx-lm-lora (default: $POET_BENCH_PEER_PYTHON, "
                   "then benchmarks/.peer-venv)")
    p.add_argument("--setup-peer", action="store_true", help="install mlx-lm-lora into benchmarks/.peer-venv and exit")
    p.add_argument("--peer-reference-blas", type=int, default=0, metavar="STEPS",
                   help="also compare with mlx-lm-lora with both on MLX's reference BLAS, for STEPS steps (slow: "
                   "~15 s a step)")
    p.add_argument("--real", action="store_true", help="the real-model benchmark instead (benchmarks/real.py): "
                   "SmolLM2-135M-Instruct, both peers, sampling, QLoRA, growth; writes benchmarks/out/real.json")
    p.add_argument("--real-sections", nargs="+", metavar="NAME", help="with --real: only these sections "
                   "(sgemm step profile peers sampling qlora growth)")
    p.add_argument("--real-plan", choices=("full", "medium", "quick"), default="full",
                   help="with --real: the sizes (benchmarks/real.py RealPlan)")
    args = p.parse_args(argv)
    if args.setup_peer:
        return setup_peer()
    if args.real:
        return main_real(args)

    plan = sections.Plan.quick() if args.quick else sections.Plan.full()
    if args.peer_reference_blas:
        plan = dataclasses.replace(plan, peer_reference_blas_steps=args.peer_reference_blas)
    work = Path(args.work)
    results = {"plan": "quick" if args.quick else "full", "machine": machine(), "sections": {}}
    tic = time.perf_counter()
    for name in args.sections:
        start = time.perf_counter()
        print(f"== {name} (load average {os.getloadavg()[0]:.2f})", flush=True)
        if name == "blas":
            data, text = sections.section_blas(work, plan)
        elif name == "models":
            data, text = sections.section_models(work, plan)
        elif name == "peer":
            data, text = sections.section_peer(work, plan, sections.peer_python(args.peer_python))
        elif name == "variants":
            if not plan.variants:
                continue
            data, text = sections.section_variants(work, plan)
        else:
            data, text = sections.section_lossmem(plan)
        results["sections"][name] = {"seconds": time.perf_counter() - start, "result": data}
        print(text, flush=True)
    results["seconds"] = time.perf_counter() - tic
    results["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    print(f"total {results['seconds']:.0f} s; results in {out}")
    return 0


def main_real(args) -> int:
    """`--real`: every section of benchmarks/real.py, its tables printed and its numbers in JSON (with the
    machine and the load average at start and end)."""
    from benchmarks import real

    out_path = Path(args.out) if "--out" in sys.argv else sections.ROOT / "benchmarks" / "out" / "real.json"
    work = Path(args.work) / "real"
    tic = time.perf_counter()
    plan = "quick" if args.quick else args.real_plan
    results = {"plan": plan, "machine": machine()}
    data, _ = real.run(work, plan, tuple(args.real_sections or real.ALL))
    results.update(data)
    results["seconds"] = time.perf_counter() - tic
    results["load_average_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out_path)
    print(f"total {results['seconds']:.0f} s; results in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

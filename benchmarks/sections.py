"""The benchmark's sections. Each measurement runs in a fresh child process (`run_child`), so its peak memory,
max RSS, compile cache and BLAS choice are its own; sections return plain dicts for the JSON file and a text
table for the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from benchmarks import workloads
from benchmarks.report import RESULT_TAG, ratio, table

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DATA = workloads.DataSpec()
"""The texts every model's tokenizer is trained on (whatever slice of them a section trains on)."""


@dataclass(frozen=True)
class Plan:
    """How much to run: `full()` (~10 minutes on 2 cores) or `quick()` (~1-2 minutes)."""

    tiny_steps: int = 8
    mid_steps: int = 5
    qwen_steps: int = 3
    qwen_layers: int = 24
    qwen_cases: tuple = ("dpo", "simpo+poet")
    mid_cases: tuple = ("dpo", "dpo+poet", "simpo", "simpo+poet")
    tiny_cases: tuple = ("dpo", "dpo+poet", "simpo", "simpo+poet")
    models: tuple = ("tiny-7.6M", "llama-25M", "qwen2.5-0.5b-4bit")
    peer_rounds: int = 2
    peer_steps: int = 8
    peer_reference_blas_steps: int = 0
    variant_steps: int = 5
    variant_pairs: int = 32
    variants: tuple = ("ours", "full_head", "one_group", "plain", "two_forwards", "second_model", "peer_like",
                       "naive_logprobs", "random_batches", "grad_checkpoint", "plain+grad_checkpoint")
    vocab_sizes: tuple = (32768, 65536, 131072, 262144)
    loss_rows: int = 4
    loss_positions: int = 64
    blas_shapes: tuple = ((256, 256, 256, False), (512, 512, 512, False), (1024, 1024, 1024, False),
                          (2048, 256, 1024, True), (2048, 1024, 256, True), (2048, 256, 7168, True))
    blas_step_steps: int = 3

    @classmethod
    def full(cls) -> "Plan":
        return cls()

    @classmethod
    def quick(cls) -> "Plan":
        return cls(tiny_steps=5, models=("tiny-7.6M",), tiny_cases=("dpo", "simpo+poet"), peer_rounds=1,
                   peer_steps=5, peer_reference_blas_steps=0, variants=(), vocab_sizes=(32768, 262144),
                   loss_rows=2, loss_positions=64, blas_shapes=((1024, 1024, 1024, False),
                                                                (2048, 256, 1024, True)), blas_step_steps=0)


def load_average() -> float:
    return os.getloadavg()[0]


def cpu_name() -> Optional[str]:
    """The CPU's model name (Linux; None elsewhere): machines lent on different days differ, and with them
    poet-mlx's JIT kernels (`-march=native`) and every rate measured."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


PEER_ENV = {"POET_MLX_JIT": "default", "POET_MLX_MALLOC": "default", "POET_MLX_ROWS": "serial"}
"""A peer's settings: it imports poet_mlx for the OpenBLAS routing only, so both sides run the same GEMMs,
and gets none of poet-mlx's other CPU settings (its compiler flags, malloc tuning, MLX's evaluation-tape
width: without POET_MLX_ROWS=serial, importing poet_mlx in the peer's process widened its tape, and
unsloth-zoo's DPO at 2 x 256 peaked at 1.90 GB instead of 1.68, 1.15 instead of 0.93 with checkpointing)."""


def child_env(env: Optional[dict] = None) -> dict:
    """A benchmark child's environment: this one's, offline, with the checkout on PYTHONPATH, updated by `env`.
    With POET_MLX_JIT=default in `env` (`PEER_ENV`) also the PATH and TMPDIR from before this process's
    `backends.jit` set up its compiler wrapper, which a child would otherwise inherit (and with it poet-mlx's
    kernel flags and kernels), and MLX's own evaluation-tape width (`backends.parallel_rows`)."""
    from poet_mlx.backends import jit, parallel_rows

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    if full_env.get(jit.ENV_SWITCH, "").lower() == "default":
        full_env = parallel_rows.outside_env(jit.outside_env(full_env))
    return full_env


def run_child(module: str, spec: dict, env: Optional[dict] = None, python: str = sys.executable,
              script: Optional[Path] = None, timeout: float = 900) -> dict:
    """Run `python -m benchmarks.<module> <spec>` (or `python <script> <spec>`) in `child_env(env)` and return
    its result dict; {"error": ...} when it fails."""
    cmd = [python, str(script)] if script else [python, "-m", f"benchmarks.{module}"]
    load = load_average()
    try:
        proc = subprocess.run(cmd + [json.dumps(spec)], cwd=ROOT, env=child_env(env), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["load_average"] = load
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# -- what to train on ----------------------------------------------------------------------------------------

def prepare(work: Path, model: str, pairs: int, layers: Optional[int] = None) -> tuple[Path, Path]:
    spec = workloads.model_spec(model, layers)
    return (workloads.model_folder(work / "models", spec, TOKENIZER_DATA),
            workloads.data_folder(work / "data", workloads.DataSpec(pairs=pairs)))


def train_config(model_dir: Path, data_dir: Path, run: Path, case: str, steps: int, batch: int,
                 max_length: int, num_layers: int, **extra) -> dict:
    """Flat poet-mlx settings for one case: "dpo", "dpo+poet", "simpo" or "simpo+poet"."""
    loss, _, poet = case.partition("+")
    cfg = {"model": str(model_dir), "data": str(data_dir), "adapter_path": str(run), "overwrite": True,
           "loss": loss, "poet": bool(poet), "num_layers": num_layers, "rank": 8, "scale": 20.0,
           "batch_size": batch, "iters": steps, "max_length": max_length,
           "max_prompt_length": max_length // 2, "learning_rate": 1e-5, "steps_per_report": 1000,
           "steps_per_eval": 0, "save_every": 0, "seed": 0}
    cfg.update(extra)
    return cfg


def run_ours(work: Path, cfg: dict, env: Optional[dict] = None) -> dict:
    cache = work / "cache" / f"{time.time_ns()}"  # fresh: the reference pass is measured, not reused
    try:
        return run_child("ours", {"cache": str(cache), "config": cfg}, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# -- sections ------------------------------------------------------------------------------------------------

MODEL_SETTINGS = {
    # model: (batch, max_length, LoRA layers)
    "tiny-7.6M": (4, 256, 4),
    "llama-25M": (4, 256, 6),
    "qwen2.5-0.5b-4bit": (1, 96, 8),
}


def section_models(work: Path, plan: Plan) -> tuple[list, str]:
    rows, results = [], []
    for model in plan.models:
        batch, max_length, lora_layers = MODEL_SETTINGS[model]
        steps, cases, layers = {"tiny-7.6M": (plan.tiny_steps, plan.tiny_cases, None),
                                "llama-25M": (plan.mid_steps, plan.mid_cases, None),
                                "qwen2.5-0.5b-4bit": (plan.qwen_steps, plan.qwen_cases, plan.qwen_layers)}[model]
        model_dir, data_dir = prepare(work, model, steps * batch, layers)
        for case in cases:
            cfg = train_config(model_dir, data_dir, work / "runs" / "run", case, steps, batch, max_length,
                               lora_layers)
            r = run_ours(work, cfg)
            r.update({"model": model, "case": case})
            results.append(r)
            if "error" in r:
                rows.append([model, case] + ["error"] + [None] * 11)
                continue
            steady_pair = (r["reference_s"] or 0) / (steps * batch) + r["step_s"] / batch
            rows.append([model, case, r["first_step_s"], r["step_s"], r["pairs_per_s"], r["tokens_per_s"],
                         r["response_tokens_per_s"], r["reference_s"], steady_pair, r["peak_train_gb"],
                         max(r["peak_before_train_gb"], r["peak_train_gb"]), r["max_rss_gb"],
                         r["scored_tokens_per_pair"], r["poet_token_saving"]])
    text = table(
        "poet-mlx training, steady state (median step after the first; the first step holds the trace/compile)",
        ["model", "case", "first s", "step s", "pairs/s", "tok/s", "resp tok/s", "ref pass s", "s/pair",
         "peak train GB", "peak all GB", "max RSS GB", "resp tok/pair", "POET saving"],
        rows,
        "tok/s: all real tokens fed (prompt + response, both rows, no padding); resp tok/s: response tokens fed "
        "(after POET's cut).\ns/pair: reference pass per pair + step per pair. resp tok/pair: response tokens "
        "fed per pair (chosen + rejected); POET saving: share of response tokens POET cuts on this data.")
    return results, text


def peer_python(explicit: Optional[str]) -> Optional[str]:
    for candidate in (explicit, os.environ.get("POET_BENCH_PEER_PYTHON"), ROOT / "benchmarks" / ".peer-venv" / "bin" / "python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def peer_args(model_dir: Path, data_dir: Path, run: Path, steps: int, batch: int, max_length: int,
              num_layers: int) -> dict:
    """mlx-lm-lora's settings matching `train_config`'s DPO case (its AdamW decays by default: plain Adam
    equals ours with weight_decay 0)."""
    return {"model": str(model_dir), "data": str(data_dir), "train": True, "train_mode": "dpo",
            "train_type": "lora", "num_layers": num_layers, "batch_size": batch, "iters": steps,
            "max_seq_length": max_length, "learning_rate": 1e-5, "beta": 0.1,
            "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}, "steps_per_report": 1,
            "steps_per_eval": 10 ** 9, "save_every": 10 ** 9, "adapter_path": str(run), "fuse": False,
            "optimizer": "adam", "seed": 0, "val_batches": 1, "grad_checkpoint": False}


def _peer_summary(r: dict) -> dict:
    import statistics

    t = r["step_times"][1:] or r["step_times"]
    toks = r["response_tokens"][1:] or r["response_tokens"]
    return {"step_s": statistics.median(t), "response_tokens_per_s": sum(toks) / sum(t),
            "peak_train_gb": r["peak_train_gb"], "peak_all_gb": max(r["peak_train_gb"], r["peak_first_step_gb"] or 0),
            "max_rss_gb": r["max_rss_gb"], "first_step_s": r["step_times"][0]}


def section_peer(work: Path, plan: Plan, python: Optional[str]) -> tuple[dict, str]:
    if python is None:
        msg = ("mlx-lm-lora comparison skipped: no peer Python. Install it with `python benchmarks/bench.py "
               "--setup-peer` (creates benchmarks/.peer-venv) or pass --peer-python PATH.\n")
        return {"skipped": msg.strip()}, msg
    batch, max_length, lora_layers = MODEL_SETTINGS["tiny-7.6M"]
    settings = [("OpenBLAS", {}, True, plan.peer_steps)] * plan.peer_rounds
    if plan.peer_reference_blas_steps:
        settings.append(("reference BLAS", {"POET_MLX_BLAS": "reference"}, False, plan.peer_reference_blas_steps))
    rows, results = [], []
    for label, env, blas, steps in settings:
        model_dir, data_dir = prepare(work, "tiny-7.6M", steps * batch)
        cfg = train_config(model_dir, data_dir, work / "runs" / "ours", "dpo", steps, batch, max_length, lora_layers)
        ours = {"ours": run_ours(work, cfg, env)}
        theirs = run_child("peer", {"blas": blas, "args": peer_args(model_dir, data_dir, work / "runs" / "peer", steps,
                                                                     batch, max_length, lora_layers)},
                           PEER_ENV, python=python, script=ROOT / "benchmarks" / "peer_runner.py")
        if blas:  # the memory-lean settings (same pairs per optimizer step), measured in the same alternation
            ours["ours, grad_checkpoint"] = run_ours(work, {**cfg, "grad_checkpoint": True}, env)
            if batch % 2 == 0:
                ours[f"ours, batch {batch // 2} x 2 accumulated"] = run_ours(
                    work, {**cfg, "batch_size": batch // 2, "grad_accumulation_steps": 2}, env)
        results.append({"blas": label, "steps": steps, "theirs": theirs, **ours})
        for name, r in ours.items():
            if "error" in r or "error" in theirs:
                rows.append([label, name, steps, "error"] + [None] * 12)
                continue
            t = _peer_summary(theirs)
            ours_all = max(r["peak_before_train_gb"], r["peak_train_gb"])
            rows.append([label, name, steps, r["step_s"], t["step_s"], ratio(r["step_s"], t["step_s"]),
                         r["response_tokens_per_s"], t["response_tokens_per_s"],
                         ratio(t["response_tokens_per_s"], r["response_tokens_per_s"]), r["peak_train_gb"],
                         t["peak_train_gb"], ratio(r["peak_train_gb"], t["peak_train_gb"]), ours_all,
                         t["peak_all_gb"], ratio(ours_all, t["peak_all_gb"]), r["max_rss_gb"], t["max_rss_gb"]])
    text = table(
        "poet-mlx vs mlx-lm-lora 5.10.2, DPO on tiny-7.6M (batch 4, max length 256, LoRA r8 on 4 layers), "
        "alternating in this run",
        ["BLAS", "poet-mlx", "steps", "ours s", "theirs s", "ratio", "ours resp tok/s", "theirs resp tok/s",
         "s/token ratio", "ours peak",
         "theirs peak", "ratio", "ours peak all", "theirs peak all", "ratio", "ours RSS", "theirs RSS"],
        rows,
        "Step: median after the first (theirs recompiles for every new batch length; ours pads to multiples of "
        "32). s/token ratio: time per response token, ours / theirs\n(the trainers draw different batches: "
        "ours each pair once, theirs batches at random). peak: MLX peak during training (GB); peak all: including "
        "loading and (ours) the reference pass. Both trainers get the same BLAS.")
    return {"rounds": results}, text


def section_variants(work: Path, plan: Plan) -> tuple[list, str]:
    batch, max_length, lora_layers = MODEL_SETTINGS["tiny-7.6M"]
    model_dir, data_dir = prepare(work, "tiny-7.6M", plan.variant_pairs)
    results, rows = [], []
    base = None
    for variant in plan.variants:
        spec = {"model": str(model_dir), "data": str(data_dir), "variant": variant, "loss": "dpo", "poet": False,
                "steps": plan.variant_steps, "batch_size": batch, "max_length": max_length,
                "max_prompt_length": max_length // 2, "num_layers": lora_layers}
        r = run_child("variants", spec)
        results.append(r)
        if "error" in r:
            rows.append([variant, "error"] + [None] * 6)
            continue
        base = r if variant == "ours" else base
        rows.append([variant, r["step_s"], ratio(r["step_s"], base["step_s"]) if base else None, r["peak_gb"],
                     ratio(r["peak_gb"], base["peak_gb"]) if base else None, r["epoch_padding_fraction"],
                     r["distinct_shapes"], r["final_loss"]])
    text = table(
        "Each speed decision against the design it replaced (DPO, tiny-7.6M, batch 4, same batches)",
        ["variant", "step s", "x ours", "peak GB", "x ours", "padding", "shapes", "loss"],
        rows,
        "full_head: logits at every fed position; one_group: one (2B, L) array; plain: both (the spine's design);\n"
        "two_forwards: plain, chosen and rejected apart; second_model: plain, reference scored by a 2nd model every "
        "step; peer_like: both (4 forwards);\nnaive_logprobs: full log_softmax; random_batches: no length "
        "bucketing; grad_checkpoint: layers recomputed in backward.\npadding: share of the fed token arrays that is "
        "padding, over one epoch; shapes: distinct compiled input shapes.")
    return results, text


def section_lossmem(plan: Plan) -> tuple[dict, str]:
    out, rows = {}, []
    for dtype in ("float32", "bfloat16"):
        r = run_child("lossmem", {"rows": plan.loss_rows, "positions": plan.loss_positions,
                                  "vocab_sizes": list(plan.vocab_sizes), "dtype": dtype})
        out[dtype] = r
        for row in r.get("table", []):
            rows.append([dtype, row["vocab"], row["logits_mb"], row["ours_fwd_extra_mb"], row["naive_fwd_extra_mb"],
                         row["ours_fwd_bwd_extra_mb"], row["naive_fwd_bwd_extra_mb"], row["ours_fwd_bwd_s"],
                         row["naive_fwd_bwd_s"]])
    text = table(
        f"Log-prob memory above the logits ({plan.loss_rows} x {plan.loss_positions} positions), MB",
        ["logits", "V", "logits MB", "ours fwd", "naive fwd", "ours fwd+bwd", "naive fwd+bwd", "ours s", "naive s"],
        rows,
        "fwd: log-probs only (reference pass); fwd+bwd: compiled gradient w.r.t. the logits (training), its "
        "own (N, T, V) result not counted.")
    return out, text


QUANT_SHAPES = ((32, 896, 4864, "bfloat16"), (32, 896, 4864, "float32"))
"""Qwen2.5-0.5B's MLP input projection at 32 tokens (MLX's native kernel is too slow for more in a benchmark)."""


def section_blas(work: Path, plan: Plan) -> tuple[dict, str]:
    """Matmul GFLOP/s with and without OpenBLAS (fresh processes), numpy's rate, and the training step."""
    spec = {"shapes": [list(s) for s in plan.blas_shapes], "numpy": True, "quant_shapes": [list(q) for q in QUANT_SHAPES]}
    fast = run_child("blasbench", spec)
    # The reference BLAS runs at ~3 GFLOP/s: one timed call per shape is plenty.
    ref = run_child("blasbench", {**spec, "numpy": False, "quant_shapes": [], "budget_s": 0.0},
                    {"POET_MLX_BLAS": "reference"})
    out = {"openblas": fast, "reference": ref}
    rows = []
    for f, r in zip(fast.get("table", []), ref.get("table", [])):
        m, k, n = f["shape"]
        rows.append([f"{m}x{k} @ {k}x{n}" + (" (w.T)" if f["transposed"] else ""), r["mlx_gflops"], f["mlx_gflops"],
                     f["numpy_gflops"], ratio(f["numpy_gflops"], f["mlx_gflops"])])
    text = table(f"fp32 matmul GFLOP/s (OpenBLAS threads: {fast.get('threads')})",
                 ["shape", "MLX reference BLAS", "MLX + OpenBLAS", "numpy sgemm", "numpy / MLX"], rows)
    qrows = [[f"{q['shape'][0]}x{q['shape'][1]} @ ({q['shape'][2]}x{q['shape'][1]}).T 4-bit", q["dtype"],
              q["native_gflops"], q["fast_gflops"], ratio(q["fast_gflops"], q["native_gflops"])]
             for q in fast.get("quant", [])]
    text += "\n" + table("4-bit matmul GFLOP/s: MLX CPU quantized_matmul vs poet_mlx.backends.fast_quant (dequantize + sgemm)",
                         ["shape", "input", "native", "fast_quant", "speed-up"], qrows)
    if plan.blas_step_steps:
        batch, max_length, lora_layers = MODEL_SETTINGS["tiny-7.6M"]
        model_dir, data_dir = prepare(work, "tiny-7.6M", plan.blas_step_steps * batch)
        steps = {}
        for label, env in (("OpenBLAS", {}), ("OpenBLAS, 2 threads", {"POET_MLX_BLAS_THREADS": "2"}),
                           ("reference BLAS", {"POET_MLX_BLAS": "reference"})):
            cfg = train_config(model_dir, data_dir, work / "runs" / "blas", "simpo", plan.blas_step_steps, batch,
                               max_length, lora_layers)
            steps[label] = run_ours(work, cfg, env)
        out["steps"] = steps
        ok = {k: v for k, v in steps.items() if "error" not in v}
        base = ok.get("OpenBLAS")
        text += "\n" + table(
            "SimPO step on tiny-7.6M (batch 4, max length 256) by BLAS setting",
            ["BLAS", "step s", "x OpenBLAS", "model GFLOP/s"],
            [[k, v["step_s"], ratio(v["step_s"], base["step_s"]) if base else None, step_gflops(v)]
             for k, v in ok.items()],
            "model GFLOP/s: matmul FLOPs of the step (forward + input-gradient backward through the frozen "
            "weights, LoRA ignored) / step time.")
    return out, text


def step_gflops(r: dict) -> Optional[float]:
    """Useful matmul rate of a tiny-7.6M training step: 4 x matmul params x real tokens / step time (forward and
    input-gradient backward through frozen weights; LoRA, attention and padded positions not counted)."""
    spec = workloads.MODELS["tiny-7.6M"]
    matmul_params = spec.params - spec.vocab * spec.hidden  # the embedding lookup is not a matmul
    tokens = r.get("tokens_per_step")
    return 4 * matmul_params * tokens / r["step_s"] / 1e9 if tokens and r.get("step_s") else None

"""The real-model benchmark (`python benchmarks/bench.py --real`): SmolLM2-135M-Instruct from poet-mlx's catalog
(float32, and the GGUF's own 4-bit weights kept as MLX 4-bit group 32), on preference pairs that fill ~512
tokens, side by side with mlx-lm-lora and unsloth-zoo's MLX DPO trainer.

Sections (each measurement in a fresh process, the load average recorded with it):
- sgemm: the machine's sgemm rate (numpy's OpenBLAS, its default threads), before and after the steps;
- step: poet-mlx's DPO+POET step at batch x length (8 x 512): step time, achieved matmul FLOP/s
  (`benchmarks.flops`) against the sgemm rate, and the same for the reference pass; per OpenBLAS thread
  setting, alternated;
- profile: where a forward pass at the step's shape spends its time (projections, attention, the rest of a
  layer, the head, glue), and its forward + backward;
- peers: poet-mlx DPO (and DPO+POET), mlx-lm-lora DPO and unsloth-zoo MLX DPO on the same model, data, LoRA
  placement (rank 8, scale 20, every linear layer of the last 16 layers), batch, lengths and OpenBLAS: step
  time, peak memory, time to a finished epoch (reference pass included);
- sampling: batched sampling (batch 16) against single-stream `mlx_lm` generation;
- qlora: the 4-bit model against the float32 one at the same settings;
- growth: peak memory and step time against batch x length and against the number of adapted layers,
  with least-squares lines.

Data: pseudo-word texts from `benchmarks.workloads`, cut with SmolLM2's tokenizer so that prompt +
response fills ~`length` tokens; chosen and rejected of a pair differ in length (what POET cuts), and the
same `train.jsonl` ({"prompt", "chosen", "rejected"}) feeds all three trainers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from benchmarks import sections, workloads
from benchmarks.report import ratio, table
from benchmarks.sections import ROOT, cpu_name, load_average, peer_python, run_child, train_config

PEER_ENV = {**sections.PEER_ENV, "UNSLOTH_ZOO_DISABLE_GPU_INIT": "1"}
"""Peers get poet-mlx's OpenBLAS routing and nothing else of its CPU settings (`sections.run_child`)."""
UNSLOTH_PIN = ["unsloth-zoo==2026.10.9"]
UNSLOTH_BASE = ["mlx[cpu]>=0.32,<0.33", "mlx-lm>=0.32,<0.33", "scipy-openblas32"]


@dataclass(frozen=True)
class RealPlan:
    step_batch: int = 8
    step_length: int = 512
    step_steps: int = 6
    step_pairs: int = 16
    """The 8 x 512 step trains `step_steps` steps on `step_pairs` pairs: 2 batches an epoch, so later epochs
    repeat batch shapes, and the step is timed where its shape is already compiled (`real_child.run_step`)."""
    threads: tuple = (0, 1)
    """OpenBLAS threads of the 8 x 512 step: 0 is poet-mlx's default (every core), 1 one thread."""
    peer_batch: int = 4
    peer_length: int = 512
    peer_steps: int = 2
    sample_models: tuple = ("float32", "4-bit")
    sample_batch: int = 16
    sample_tokens: int = 48
    qlora: bool = True
    checkpoint_rows: bool = True
    """Also poet-mlx with --grad-checkpoint (peers, and QLoRA against float32 where weights dominate)."""
    growth_points: tuple = ((2, 128), (2, 256), (4, 256), (4, 512))
    growth_layers: tuple = (4, 16, 30)
    growth_layers_at: tuple = (2, 256)
    growth_steps: int = 2
    num_layers: int = 16
    profile_calls: int = 3

    @classmethod
    def plan(cls, name: str) -> "RealPlan":
        """"full" (over an hour on 2 cores: the 8 x 512 step alone takes ~10 min per thread setting), "medium"
        (the realistic 8 x 512 step and its profile, sampling, the peers and QLoRA at 2 x 256; ~23 min with
        the warm-up) or "quick" (~15 min)."""
        return {"full": cls, "medium": cls.medium, "quick": cls.quick}[name]()

    @classmethod
    def medium(cls) -> "RealPlan":
        return cls(threads=(0,), peer_batch=2, peer_length=256, peer_steps=4, profile_calls=1,
                   growth_points=((1, 128), (2, 128), (2, 256), (4, 256)), growth_layers=(4, 16, 30),
                   growth_layers_at=(1, 128))

    @classmethod
    def quick(cls) -> "RealPlan":
        return cls(step_batch=4, step_length=256, step_pairs=8, threads=(0,), peer_batch=2, peer_length=256,
                   sample_models=("float32",), sample_tokens=24, growth_points=((1, 128), (2, 128), (2, 256)),
                   growth_layers=(4, 16), growth_layers_at=(1, 128), checkpoint_rows=False)


# -- setup -----------------------------------------------------------------------------------------------------

def unsloth_python() -> Optional[str]:
    p = ROOT / "benchmarks" / ".peer-venv-unsloth" / "bin" / "python"
    return str(p) if p.is_file() else None


def setup_unsloth() -> str:
    """unsloth-zoo in benchmarks/.peer-venv-unsloth: MLX, mlx-lm and OpenBLAS, then unsloth-zoo with --no-deps
    (its declared dependencies are the CUDA stack)."""
    import subprocess
    import sys

    venv = ROOT / "benchmarks" / ".peer-venv-unsloth"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + UNSLOTH_BASE, check=True)
    subprocess.run(pip + ["--no-deps"] + UNSLOTH_PIN, check=True)
    return str(venv)


def models() -> dict:
    """{"float32": folder, "4-bit": folder} of SmolLM2-135M-Instruct (poet-mlx's catalog; cached)."""
    from poet_mlx.catalog import fetch

    return {"4-bit": str(fetch("smollm2-135m-instruct").path),
            "float32": str(fetch("smollm2-135m-instruct", dequantized=True).path)}


def _cut(tok, text: str, n: int) -> str:
    """The longest word prefix of `text` with at most n tokens."""
    enc = tok.encode(text, add_special_tokens=False)
    if len(enc.ids) <= n:
        return text
    end = enc.offsets[n - 1][1]
    return text[:end].rsplit(" ", 1)[0]


def real_data(work: Path, model_dir: str, pairs: int, length: int, seed: int = 0) -> Path:
    """A folder with train.jsonl: `pairs` rows whose prompt + response fill ~`length` SmolLM2 tokens, the
    prompt ~length/10, each response 70-100% of the room (so chosen and rejected differ), built once."""
    out = work / f"real-data-{pairs}-{length}-{seed}"
    if (out / "train.jsonl").is_file():
        return out
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    rng = random.Random(seed)
    spec = workloads.DataSpec(pairs=pairs, prompt_words=(length // 8, length // 6),
                              response_words=(length, 2 * length), seed=seed)
    rows = []
    for r in workloads.make_rows(spec):
        prompt = _cut(tok, r["prompt"], max(8, length // 10)).rstrip(".") + "?"
        room = length - len(tok.encode(prompt).ids) - 24  # the chat template's tokens
        rows.append({"prompt": prompt, "chosen": _cut(tok, r["chosen"], int(room * rng.uniform(0.7, 1.0))),
                     "rejected": _cut(tok, r["rejected"], int(room * rng.uniform(0.7, 1.0)))})
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "train.jsonl")
    return out


# -- runs ------------------------------------------------------------------------------------------------------

def ours(work: Path, model: str, case: str, batch: int, length: int, steps: int, layers: int,
         env: Optional[dict] = None, pairs: Optional[int] = None, reference_twice: bool = False, **extra) -> dict:
    """poet-mlx training `steps` steps on `pairs` pairs (default batch x steps) in a child process
    (`real_child.run_step`); `reference_twice`: also time the reference pass traced and compiled."""
    data = real_data(work, model, pairs or batch * steps, length)
    cfg = train_config(Path(model), data, work / "runs" / "ours", case, steps, batch, length, layers,
                       max_prompt_length=length // 2, **extra)
    cache = work / "cache" / f"{time.time_ns()}"  # fresh: the reference pass is measured
    spec = {"mode": "step", "cache": str(cache), "config": cfg, "reference_twice": reference_twice}
    try:
        r = run_child("real_child", spec, env, timeout=3600)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    r.update({"system": "poet-mlx", "case": case, "batch": batch, "length": length, "layers": layers})
    return r


def mlx_lm_lora(work: Path, python: str, model: str, batch: int, length: int, steps: int, layers: int) -> dict:
    from benchmarks.sections import _peer_summary, peer_args

    data = real_data(work, model, batch * steps, length)
    args = peer_args(Path(model), data, work / "runs" / "mlx-lm-lora", steps, batch, length, layers)
    r = run_child("", {"args": args}, PEER_ENV, python=python, script=ROOT / "benchmarks" / "peer_runner.py",
                  timeout=3600)
    if "error" not in r:
        r.update(_peer_summary(r))
    r.update({"system": "mlx-lm-lora 5.10.2", "case": "dpo", "batch": batch, "length": length})
    return r


def unsloth(work: Path, python: str, model: str, batch: int, length: int, steps: int, layers: int,
            grad_checkpoint: bool = False) -> dict:
    data = real_data(work, model, batch * steps, length)
    args = {"model": model, "data": str(data / "train.jsonl"), "max_length": length,
            "max_prompt_length": length // 2, "rank": 8, "scale": 20.0, "num_layers": layers,
            "grad_checkpoint": grad_checkpoint, "batch_size": batch, "steps": steps, "learning_rate": 1e-5, "beta": 0.1,
            "output_dir": str(work / "runs" / "unsloth")}
    r = run_child("", {"args": args}, PEER_ENV, python=python, script=ROOT / "benchmarks" / "unsloth_runner.py",
                  timeout=3600)
    if "error" not in r:
        t = r["step_times"][1:] or r["step_times"]
        r.update({"step_s": sorted(t)[len(t) // 2], "peak_all_gb": max(r["peak_train_gb"], r["peak_first_step_gb"] or 0)})
    r.update({"system": "unsloth-zoo 2026.10.9 (MLX)", "case": "dpo, grad ckpt" if grad_checkpoint else "dpo",
              "batch": batch, "length": length, "grad_checkpoint": grad_checkpoint})
    return r


# -- sections --------------------------------------------------------------------------------------------------

def section_sgemm(work: Path, plan: RealPlan, label: str) -> tuple[dict, str]:
    shapes = [(plan.step_batch * 2 * plan.step_length, 576, 1536), (plan.step_batch * 2 * plan.step_length, 1536, 576),
              (4096, 576, 12288), (2048, 2048, 2048)]
    r = run_child("real_child", {"mode": "sgemm", "shapes": shapes})
    if "error" in r:
        return r, f"sgemm ({label}): {r['error']}\n"
    rows = [[f"{m}x{k} @ {k}x{n}", x["numpy_gflops"], x["mlx_gflops"]] for x, (m, k, n) in
            zip(r["table"], [tuple(t["shape"]) for t in r["table"]])]
    return r, table(f"sgemm GFLOP/s ({label}; load {r['load_average']:.2f})",
                    ["shape", "numpy (default threads)", f"MLX + OpenBLAS ({r['mlx_blas_threads']} thr)"], rows)


def section_step(work: Path, plan: RealPlan, m: dict, best_gflops: float) -> tuple[list, str]:
    from poet_mlx.backends.blas import blas_threads

    results, rows = [], []
    for threads in plan.threads:
        env = {"POET_MLX_BLAS_THREADS": str(threads)} if threads else {}
        r = ours(work, m["float32"], "dpo+poet", plan.step_batch, plan.step_length, plan.step_steps,
                 plan.num_layers, env, pairs=plan.step_pairs, reference_twice=True)
        r["threads"] = threads or f"default ({blas_threads()})"
        results.append(r)
        if "error" in r:
            rows.append([r["threads"], "error: " + r["error"][:80]] + [None] * 11)
            continue
        rows.append([r["threads"], r["compiled_step_s"], r["step_gflops"], ratio(r["step_gflops"], best_gflops),
                     r["new_shape_step_s"], ratio(r["new_shape_step_gflops"], best_gflops),
                     r["reference_compiled_s"], r["reference_compiled_gflops"],
                     ratio(r["reference_compiled_gflops"], best_gflops), r["reference_s"],
                     ratio(r["reference_gflops"], best_gflops), r["peak_train_gb"], r["padding"], r["load_average"]])
    text = table(
        f"Target 1: SmolLM2-135M float32, DPO+POET, LoRA r8 x {plan.num_layers} layers, batch {plan.step_batch} x "
        f"{plan.step_length} tokens; best sgemm {best_gflops:.0f} GFLOP/s (numpy)",
        ["BLAS thr", "step s", "step GFLOP/s", "/ sgemm", "new shape s", "/ sgemm", "ref pass s", "ref GFLOP/s",
         "/ sgemm", "ref in run s", "/ sgemm", "peak GB", "padding", "load"], rows,
        "GFLOP/s: useful matmul FLOPs (benchmarks/flops.py) / time. Step: the median of the steps whose batch "
        "shape an earlier step had\n(compiled); new shape: a later step with a shape not seen before (it traces "
        "and compiles the step first). Ref pass: the DPO\nreference log-probs of the run's pairs (no POET cut), "
        "compiled (a second pass in one process); in run: the run's own pass,\nevery batch shape new.\n"
        "Targets: step >= 0.5 x sgemm, reference pass >= 0.6 x sgemm.")
    return results, text


def section_profile(work: Path, plan: RealPlan, m: dict, best_gflops: float) -> tuple[dict, str]:
    """Target 1's breakdown: a forward pass at the step's shape (every row full length, half of it scored)
    split into its parts (`real_child.run_profile`), each part's achieved rate against the sgemm rate."""
    from benchmarks import flops

    rows_n, n = plan.step_batch * 2, plan.step_length
    r = run_child("real_child", {"mode": "profile", "model": m["float32"], "rows": rows_n, "length": n,
                                 "scored": n // 2, "layers": plan.num_layers, "calls": plan.profile_calls},
                  timeout=3600)
    if "error" in r:
        return r, f"profile: {r['error']}\n"
    shape = flops.Shape.from_config(m["float32"])
    f = flops.row_flops(shape, n, n // 2, 0, 8, False)
    useful = {"projections (7 matmuls)": f["layers_forward"] * rows_n,
              "attention core (RoPE + causal softmax(QK^T)V)": f["attention_forward"] * rows_n,
              "head (scored positions, log-probs)": f["head_forward"] * rows_n}
    rows = []
    for name, sec in r["parts_s"].items():
        rate = useful[name] / sec / 1e9 if name in useful and sec else None
        rows.append([name, sec, sec / r["forward_s"], rate, ratio(rate, best_gflops) if rate else None])
    total = sum(useful.values())
    rows.append(["whole forward", r["forward_s"], 1.0, total / r["forward_s"] / 1e9,
                 ratio(total / r["forward_s"] / 1e9, best_gflops)])
    r["useful_flops"] = useful
    text = table(f"Target 1 breakdown: one forward at {rows_n} rows x {n} tokens ({n // 2} scored), SmolLM2-135M "
                 f"float32, load {r['load_average']:.2f}", ["part", "s", "share", "GFLOP/s", "/ sgemm"], rows,
                 f"Forward + backward through LoRA on {plan.num_layers} layers: {r['forward_backward_s']:.2f} s "
                 f"({r['forward_backward_s'] / r['forward_s']:.2f}x the forward; uncompiled). Parts are timed alone, "
                 "compiled, on the same shapes; glue = whole - parts.")
    return r, text


def _peak(r: dict) -> float:
    """A run's peak: the larger of training and the reference pass."""
    return r.get("peak_all_gb") or max(r.get("peak_train_gb", 0), r.get("peak_before_train_gb", 0))


def section_peers(work: Path, plan: RealPlan, m: dict) -> tuple[list, str]:
    b, n, s, layers = plan.peer_batch, plan.peer_length, plan.peer_steps, plan.num_layers
    runs = [ours(work, m["float32"], "dpo", b, n, s, layers), ours(work, m["float32"], "dpo+poet", b, n, s, layers)]
    if plan.checkpoint_rows:
        runs.append(ours(work, m["float32"], "dpo", b, n, s, layers, grad_checkpoint=True))
        runs[-1]["case"] = "dpo, grad ckpt"
    missing = []
    if (py := unsloth_python()) is None:
        missing.append("unsloth-zoo")
    else:
        runs.append(unsloth(work, py, m["float32"], b, n, s, layers))
        if plan.checkpoint_rows:  # like for like with poet-mlx's checkpointed row (unsloth-zoo's own default)
            runs.append(unsloth(work, py, m["float32"], b, n, s, layers, grad_checkpoint=True))
    if (py := peer_python(None)) is None:
        missing.append("mlx-lm-lora")
    else:
        runs.append(mlx_lm_lora(work, py, m["float32"], b, n, s, layers))
    for r in runs:
        if "error" not in r:
            r["peak_all_gb"] = _peak(r)
    peers = [r for r in runs if r["system"] != "poet-mlx" and "error" not in r]
    plain_peers = [r for r in peers if not r.get("grad_checkpoint")]
    fastest = min(plain_peers, key=lambda r: r["step_s"]) if plain_peers else None
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([r["system"], r["case"], "error: " + r["error"][:90]] + [None] * 7)
            continue
        ckpt = "grad ckpt" in r["case"]
        same = next((p for p in peers if p["system"] == fastest["system"] and ("grad ckpt" in p["case"]) == ckpt),
                    None) if fastest else None
        rows.append([r["system"], r["case"], r["step_s"], r["wall_s"], r["peak_all_gb"], r.get("max_rss_gb"),
                     ratio(r["step_s"], fastest["step_s"]) if fastest else None,
                     ratio(r["peak_all_gb"], fastest["peak_all_gb"]) if fastest else None,
                     ratio(r["peak_all_gb"], same["peak_all_gb"]) if same else None, r["load_average"]])
    text = table(
        f"Target 2: side by side, SmolLM2-135M float32, DPO, batch {b} x {n}, {b * s} pairs = one epoch "
        f"({s} steps), LoRA r8 x {layers} layers, OpenBLAS for all",
        ["system", "case", "step s", "epoch s", "peak GB", "max RSS GB", "x fastest peer time",
         "x its peak", "x its peak, same ckpt", "load"], rows,
        "step s: median step after the first; epoch s: the whole run after loading (reference pass, compile, "
        "every step).\nTargets: poet-mlx DPO <= 0.5 x the faster peer's step time and <= 0.6 x its peak."
        + _peer_verdict(rows) + (f"\nNot installed, so not run: {', '.join(missing)} "
                                 "(`python benchmarks/bench.py --setup-peer`)." if missing else ""))
    return runs, text


def _peer_verdict(rows: list) -> str:
    """Which poet-mlx cases meet both targets against the faster peer's run without checkpointing (columns
    'x fastest peer time' and 'x its peak'), and which also against the peer's run with the same setting."""
    ours_rows = [r for r in rows if r[0] == "poet-mlx" and r[6] is not None]
    if not ours_rows:
        return ""
    both = [r[1] for r in ours_rows if r[6] <= 0.5 and r[7] <= 0.6]
    alike = [r[1] for r in ours_rows if r[6] <= 0.5 and r[8] is not None and r[8] <= 0.6]
    return (f"\nBoth targets met against the faster peer's fastest run by: {', '.join(both) or 'no case'}; "
            f"also against its run with the same checkpointing: {', '.join(alike) or 'no case'}.")


def section_sampling(work: Path, plan: RealPlan, m: dict) -> tuple[list, str]:
    results, rows = [], []
    for kind in plan.sample_models:
        r = run_child("real_child", {"mode": "sample", "model": m[kind], "max_tokens": plan.sample_tokens,
                                     "temperature": 0.7, "batch_size": plan.sample_batch}, timeout=3600)
        r["model"] = kind
        results.append(r)
        if "error" in r:
            rows.append([kind, "error: " + r["error"][:90]] + [None] * 9)
            continue
        rows.append([kind, r["single_generation_tps"], r["batched_decode_tps"], r["decode_speedup"],
                     r["single_wall_tps"], r["batched_tps"], r["wall_speedup"], r["speedup"],
                     r.get("default_tps"), r.get("default_wall_speedup"), r["load_average"]])
    b = plan.sample_batch
    text = table(f"Target 3: sampling, SmolLM2-135M, {plan.sample_tokens} tokens per reply, temperature 0.7",
                 ["model", "single decode tok/s", f"batched ({b}) decode", "x", "single incl. prefill",
                  f"batched ({b}) incl. prefill", "x", "x (batched incl. / single decode)",
                  "default batch, 64 replies, incl. prefill", "x (vs single incl.)", "load"], rows,
                 "single: mlx_lm.stream_generate, one reply (what chat and chat --compare do, one reply at a "
                 "time), decode = its generation tokens/s; batched: poet_mlx.generate.sampling.sample (eval "
                 "--generate, pairs), decode = the extra tokens of a full run over a short one per extra second, "
                 "incl. prefill = wall time of the full run; default batch: 64 replies (4 seeds per prompt) "
                 "with no batch size given (`sampling.batch_rows`: up to 64 rows).\nTarget: >= 8x (decode "
                 "against decode, as mlx_lm.generate reports tokens/s; the other ratios for completeness).")
    return results, text


def section_qlora(work: Path, plan: RealPlan, m: dict, fp32: Optional[dict]) -> tuple[dict, str]:
    b, n, s = plan.peer_batch, plan.peer_length, plan.peer_steps
    q = ours(work, m["4-bit"], "dpo+poet", b, n, s, plan.num_layers)
    if fp32 is None or "error" in fp32:
        fp32 = ours(work, m["float32"], "dpo+poet", b, n, s, plan.num_layers)
    cases = [("float32", fp32), ("4-bit g32 (GGUF Q4_1)", q)]
    if plan.checkpoint_rows:
        cases += [(f"{label}, grad ckpt", ours(work, m[kind], "dpo+poet", b, n, s, plan.num_layers, grad_checkpoint=True))
                  for label, kind in (("float32", "float32"), ("4-bit g32", "4-bit"))]
    rows = [[label, r.get("step_s"), _peak(r), r.get("max_rss_gb"), r.get("load_average")] for label, r in cases]
    qpeak, fpeak = _peak(q), _peak(fp32)
    out = {"cases": {label: r for label, r in cases}, "memory_ratio": ratio(qpeak, fpeak), "time_ratio": ratio(q.get("step_s"), fp32.get("step_s"))}
    summary = (f"4-bit / float32: peak {out['memory_ratio'] or float('nan'):.2f}x, step time "
               f"{out['time_ratio'] or float('nan'):.2f}x")
    if plan.checkpoint_rows:
        qc, fc = dict(cases)["4-bit g32, grad ckpt"], dict(cases)["float32, grad ckpt"]
        out["memory_ratio_ckpt"] = ratio(_peak(qc), _peak(fc))
        out["time_ratio_ckpt"] = ratio(qc.get("step_s"), fc.get("step_s"))
        summary += (f"; both with grad ckpt: peak {out['memory_ratio_ckpt'] or float('nan'):.2f}x, step time "
                    f"{out['time_ratio_ckpt'] or float('nan'):.2f}x")
    text = table(f"Target 4: QLoRA, DPO+POET, batch {b} x {n}", ["model", "step s", "peak GB", "max RSS GB", "load"],
                 rows, summary + " (peak: the larger of training and the reference pass). Target: peak < 0.5x.")
    return out, text


def _line(xs, ys) -> tuple:
    """Least-squares y = a + b x, and the largest relative residual."""
    n = len(xs)
    mx_, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx_) ** 2 for x in xs) or 1.0
    b = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx_
    worst = max(abs(a + b * x - y) / abs(y) for x, y in zip(xs, ys) if y)
    return a, b, worst


def section_growth(work: Path, plan: RealPlan, m: dict) -> tuple[dict, str]:
    pts = []
    for b, n in plan.growth_points:
        r = ours(work, m["float32"], "dpo+poet", b, n, plan.growth_steps, plan.num_layers)
        pts.append(r)
    lay = []
    for layers in plan.growth_layers:
        b, n = plan.growth_layers_at
        lay.append(ours(work, m["float32"], "dpo+poet", b, n, plan.growth_steps, layers))
    ok = [r for r in pts if "error" not in r]
    okl = [r for r in lay if "error" not in r]
    fits = {}
    if len(ok) >= 2:
        x = [r["tokens_per_step"] for r in ok]
        fits["peak_vs_tokens"] = _line(x, [r["peak_train_gb"] for r in ok])
        fits["step_vs_tokens"] = _line(x, [r["step_s"] for r in ok])
    if len(okl) >= 2:
        x = [r["layers"] for r in okl]
        fits["peak_vs_layers"] = _line(x, [r["peak_train_gb"] for r in okl])
        fits["step_vs_layers"] = _line(x, [r["step_s"] for r in okl])
    rows = [[f"{r['batch']} x {r['length']}", r["layers"], r.get("tokens_per_step"), r.get("step_s"),
             r.get("peak_train_gb"), r.get("load_average")] for r in pts + lay]
    notes = [f"{k}: {a:.3g} + {b_:.3g} x (worst residual {w:.0%})" for k, (a, b_, w) in fits.items()]
    text = table("Target 5: growth, SmolLM2-135M float32, DPO+POET",
                 ["batch x length", "LoRA layers", "tokens/step", "step s", "peak train GB", "load"], rows,
                 "Lines (x = real tokens per step, or adapted layers): " + "; ".join(notes))
    return {"points": pts, "layers": lay, "fits": fits}, text


ALL = ("sgemm", "step", "profile", "peers", "sampling", "qlora", "growth")
COLD = frozenset(ALL) - {"sgemm"}
"""Sections whose timings include MLX's first-use kernel compiles unless `warm_up` ran first."""


def _kernel_count(folder: Optional[str]) -> Optional[int]:
    """Kernels in poet-mlx's JIT folder (`backends.jit`), None where it is not in use."""
    return sum(1 for _ in Path(folder).rglob("*.so")) if folder else None


def warm_up(work: Path, plan: RealPlan, m: dict, sections: tuple) -> tuple[dict, str]:
    """One-step runs of what the sections will time: poet-mlx per model kind at 1 x the step's length with its
    reference pass (plain and with --grad-checkpoint), and for "peers" each installed peer at 1 x the peers'
    length. MLX compiles its fused CPU kernels on first use and keeps them on disk, once per machine (poet-mlx's
    in its own folder, `backends.jit`; the peers' in MLX's default one), and without this the first timed run
    pays for it: on a fresh machine (2026-12-03) the 8 x 512 reference pass took 80 s where a warm one takes
    ~39 s, and unsloth-zoo's first epoch (4 pairs) 106 s against 22.6 s for its next run. Kernels depend on
    the graph, not the batch; the length sets the attention's block count, hence the sections' lengths."""
    from poet_mlx.backends import jit

    folder = jit.enable_fast_jit().where  # here, so that the children adopt it and the count covers them
    before, tic, runs = _kernel_count(folder), time.perf_counter(), []
    ckpts = (False, True) if plan.checkpoint_rows else (False,)

    def note(system, r, **what):
        runs.append({"system": system, **what, "seconds": r.get("wall_s"), "error": r.get("error")})

    kinds = ("float32", "4-bit") if plan.qlora or "4-bit" in plan.sample_models else ("float32",)
    for kind in kinds:
        for ckpt in ckpts:
            note("poet-mlx", ours(work, m[kind], "dpo+poet", 1, plan.step_length, 1, plan.num_layers,
                                  grad_checkpoint=ckpt), model=kind, grad_checkpoint=ckpt)
    if "peers" in sections:
        if (py := unsloth_python()) is not None:
            for ckpt in ckpts:
                note("unsloth-zoo", unsloth(work, py, m["float32"], 1, plan.peer_length, 1, plan.num_layers, ckpt),
                     grad_checkpoint=ckpt)
        if (py := peer_python(None)) is not None:
            note("mlx-lm-lora", mlx_lm_lora(work, py, m["float32"], 1, plan.peer_length, 1, plan.num_layers))
    after = _kernel_count(folder)
    data = {"seconds": time.perf_counter() - tic, "kernels_before": before, "kernels_after": after, "runs": runs}
    new = "n/a" if folder is None else after - before
    failed = [f"{r['system']}: {r['error'][:80]}" for r in runs if r["error"]]
    return data, (f"warm-up: {len(runs)} one-step runs in {data['seconds']:.0f} s, {new} poet-mlx kernels "
                  f"compiled (first use on this machine; not part of any timing below)"
                  + "".join(f"\n  failed: {f}" for f in failed) + "\n")


def run(work: Path, plan_name: str, sections: tuple = ALL) -> tuple[dict, str]:
    """Every section of the plan ("full", "medium", "quick"); returns (JSON-able results, the printed text)."""
    plan = RealPlan.plan(plan_name)
    work.mkdir(parents=True, exist_ok=True)
    m = models()
    out = {"plan": asdict(plan), "models": m, "sections": {}}
    texts = [f"CPU: {cpu_name() or 'unknown'}, {os.cpu_count()} cores\n"]
    print(texts[0], flush=True)

    def emit(name, data, text, started):
        out["sections"][name] = {"seconds": time.perf_counter() - started, "load_average_start": load_start,
                                 "result": data}
        texts.append(text)
        print(text, flush=True)

    def sgemm_so_far() -> float:
        """The sgemm section's best numpy rate, NaN where it did not run (yet)."""
        return out["sections"].get("sgemm", {}).get("result", {}).get("best_numpy_gflops") or float("nan")

    best = []
    if COLD & set(sections):
        load_start, tic = os.getloadavg(), time.perf_counter()
        print(f"== real: warm-up (load average {load_average():.2f})", flush=True)
        emit("warmup", *warm_up(work, plan, m, sections), tic)
    for name in sections:
        load_start = os.getloadavg()
        tic = time.perf_counter()
        print(f"== real: {name} (load average {load_average():.2f})", flush=True)
        if name == "sgemm":
            data, text = section_sgemm(work, plan, "before the steps")
        elif name == "step":
            data, text = section_step(work, plan, m, sgemm_so_far())
        elif name == "profile":
            data, text = section_profile(work, plan, m, sgemm_so_far())
        elif name == "peers":
            data, text = section_peers(work, plan, m)
        elif name == "sampling":
            data, text = section_sampling(work, plan, m)
        elif name == "qlora":
            fp32 = next((r for r in out["sections"].get("peers", {}).get("result", [])
                         if r.get("system") == "poet-mlx" and r.get("case") == "dpo+poet"), None)
            data, text = section_qlora(work, plan, m, fp32)
        else:
            data, text = section_growth(work, plan, m)
        emit(name, data, text, tic)
        if name == "sgemm" and "best_numpy_gflops" in data:
            best.append(data["best_numpy_gflops"])
    if "sgemm" in sections and "step" in sections:
        load_start = os.getloadavg()
        tic = time.perf_counter()
        data, text = section_sgemm(work, plan, "after the steps")
        emit("sgemm_after", data, text, tic)
        if "best_numpy_gflops" in data:
            best.append(data["best_numpy_gflops"])
        out["best_sgemm_gflops"] = max(best) if best else None
        steps = out["sections"]["step"]["result"]
        for r in steps:
            if "error" not in r and best:
                r["step_fraction_of_best"] = r["step_gflops"] / max(best)
                r["new_shape_fraction_of_best"] = (r["new_shape_step_gflops"] or 0) / max(best)
                r["reference_fraction_of_best"] = (r["reference_compiled_gflops"] or 0) / max(best)
                r["reference_in_run_fraction_of_best"] = (r["reference_gflops"] or 0) / max(best)
        summary = table(f"Target 1 against the best sgemm of the run ({max(best) if best else float('nan'):.0f} GFLOP/s)",
                        ["BLAS thr", "step GFLOP/s", "/ best", "new shape / best", "ref GFLOP/s", "/ best",
                         "ref in run / best"],
                        [[r["threads"], r.get("step_gflops"), r.get("step_fraction_of_best"),
                          r.get("new_shape_fraction_of_best"), r.get("reference_compiled_gflops"),
                          r.get("reference_fraction_of_best"), r.get("reference_in_run_fraction_of_best")]
                         for r in steps])
        texts.append(summary)
        print(summary, flush=True)
    return out, "\n".join(texts)


def quick_plan_dict() -> dict:
    return asdict(replace(RealPlan.quick()))

"""The real-model benchmark's measurements, one per fresh process (`python -m benchmarks.real_child '<spec>'`):
- "sgemm": the machine's sgemm rate: numpy's OpenBLAS (its default threads: the machine's best) and MLX's
  matmul through poet-mlx's OpenBLAS, at the shapes of a SmolLM2 training step;
- "step": a poet-mlx training run (`benchmarks.ours.run_case`) plus its matmul FLOPs per step and for the
  reference pass (`benchmarks.flops`), from the same batches the trainer draws;
- "sample": single-stream generation (`mlx_lm.stream_generate`, what `chat` uses) against batched sampling
  (`poet_mlx.generate.sampling.sample`, what `eval --generate` and `pairs` use);
- "profile": a forward pass at the step's shape split into its parts (projections, attention, the rest of a
  layer, the head, glue), and its forward + backward.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Optional

import poet_mlx  # noqa: F401  (first: OpenBLAS before mlx.core, unless POET_MLX_BLAS=reference)
from benchmarks.report import child_main


def _timed(fn, calls: int = 3) -> float:
    """Median seconds of `fn()` (which evaluates its result), after one warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _median_rate(fn, flops: float, calls: int = 5) -> float:
    return flops / _timed(fn, calls) / 1e9


def run_sgemm(spec: dict) -> dict:
    import mlx.core as mx
    import numpy as np

    from poet_mlx.backends import blas

    rows = []
    for m, k, n in spec["shapes"]:
        a, b = np.random.default_rng(0).standard_normal((2, max(m, n), k), dtype=np.float32)
        a, w = np.ascontiguousarray(a[:m]), np.ascontiguousarray(b[:n])
        am, wm = mx.array(a), mx.array(w)
        flops = 2.0 * m * n * k
        rows.append({"shape": [m, k, n], "numpy_gflops": _median_rate(lambda: a @ w.T, flops),
                     "mlx_gflops": _median_rate(lambda: mx.eval(am @ wm.T), flops)})
    return {"table": rows, "best_numpy_gflops": max(r["numpy_gflops"] for r in rows),
            "best_mlx_gflops": max(r["mlx_gflops"] for r in rows), "mlx_blas_threads": blas.STATUS.threads}


def step_flops(config: dict, steps: int) -> dict:
    """Matmul FLOPs of each training step's batch and of the reference pass, the padding fed and each step's
    batch shape, from the trainer's own data path (tokenization, POET layouts, epoch order, feed)."""
    from mlx_lm.utils import load_tokenizer

    from benchmarks import flops
    from poet_mlx.batching import epoch_batches, make_feed, padding_fraction, pair_set
    from poet_mlx.config import RunConfig
    from poet_mlx.data.splits import read_split, tokenize_split
    from poet_mlx.models import resolve_model_path
    from poet_mlx.reporting import Reporter

    cfg = RunConfig.from_flat(config, source="benchmark")
    path = resolve_model_path(cfg.model.model)
    shape = flops.Shape.from_config(path)
    tok = load_tokenizer(path)
    pairs = tokenize_split(cfg, *read_split(cfg, "train", Reporter()), tok, "train", Reporter()).pairs
    ps = pair_set(pairs, cfg.loss)
    adapted = shape.layers if cfg.lora.num_layers == -1 else cfg.lora.num_layers
    b = cfg.train.batch_size
    order = [batch for epoch in range(steps * b // max(1, len(pairs)) + 1)
             for batch in epoch_batches([lay.tokens for lay in ps.layouts], b, cfg.train.seed, epoch)][:steps]
    per_step, padding, shapes = [], [], []
    for idx in order:
        rows = []
        for i in idx:
            p, lay = pairs[i], ps.layouts[i]
            for keep in (lay.keep_chosen, lay.keep_rejected):
                rows.append(flops.row_flops(shape, len(p.prompt) + keep - 1, keep, adapted, cfg.lora.rank, True))
        per_step.append(flops.total(rows))
        batch = ps.batch(idx, 0)
        padding.append(padding_fraction(batch))
        feed = make_feed(batch)
        shapes.append([list(g.shape) for g in feed.groups] + [len(p) for p in feed.group_positions])
    ref = flops.total([flops.row_flops(shape, len(p.prompt) + len(r) - 1, len(r), adapted, cfg.lora.rank, False)
                       for p in pairs for r in (p.chosen, p.rejected)])
    return {"per_step": per_step, "reference": ref, "padding": padding, "pairs": len(pairs), "shapes": shapes,
            "tokenized": pairs, "model_path": str(path)}


def compiled_steps(shapes: list) -> tuple[list[int], list[int]]:
    """(steps whose batch shape an earlier step had: the compiled step runs as it is, steps after the first
    with a new shape: they trace and compile the step first), as step indices."""
    compiled = [i for i, s in enumerate(shapes) if s in shapes[:i]]
    return compiled, [i for i in range(1, len(shapes)) if i not in compiled]


def _rate(f: dict, times: list, steps: list) -> Optional[float]:
    return sum(f["per_step"][i]["total"] for i in steps) / sum(times[i] for i in steps) / 1e9 if steps else None


def reference_twice(model_path: str, pairs: list) -> list[float]:
    """Seconds of two reference passes over `pairs` in one process, as the trainer runs them (the base model,
    `train.reference`'s batch): the first traces and compiles each batch shape, the second runs compiled."""
    from poet_mlx.data.tokenization import pad_id
    from poet_mlx.models import load_model
    from poet_mlx.scoring import pair_token_logps
    from poet_mlx.train.reference import REFERENCE_BATCH

    model, tok, _ = load_model(model_path)
    times = []
    for _ in range(2):
        tic = time.perf_counter()
        pair_token_logps(model, pairs, REFERENCE_BATCH, pad_id(tok))
        times.append(time.perf_counter() - tic)
    return times


def run_step(spec: dict) -> dict:
    """A training run (`benchmarks.ours.run_case`) and its achieved matmul FLOP/s. The step's rate is over the
    steps whose batch shape was compiled by an earlier step (`compiled_steps`; else every step after the
    first), the steps that met a new shape are reported apart; with spec["reference_twice"] also the
    reference pass traced and compiled (`reference_twice`)."""
    from benchmarks import ours

    out = ours.run_case(spec)
    times = out["step_times"]
    f = step_flops(spec["config"], len(times))
    compiled, traced = compiled_steps(f["shapes"])
    steady = compiled or traced or [0]
    out.update({
        "flops_per_step": [s["total"] for s in f["per_step"]],
        "flops_parts": f["per_step"][steady[0]],
        "step_shapes": f["shapes"],
        "compiled_steps": compiled,
        "new_shape_steps": traced,
        "step_gflops": _rate(f, times, steady),
        "compiled_step_s": statistics.median(times[i] for i in steady),
        "new_shape_step_s": statistics.median(times[i] for i in traced) if traced else None,
        "new_shape_step_gflops": _rate(f, times, traced),
        "reference_flops": f["reference"]["total"],
        "reference_gflops": f["reference"]["total"] / out["reference_s"] / 1e9 if out.get("reference_s") else None,
        "padding": statistics.fmean(f["padding"]),
        "data_pairs": f["pairs"],
    })
    if spec.get("reference_twice"):
        first, again = reference_twice(f["model_path"], f["tokenized"])
        out.update({"reference_first_s": first, "reference_compiled_s": again,
                    "reference_compiled_gflops": f["reference"]["total"] / again / 1e9})
    return out


def run_sample(spec: dict) -> dict:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from poet_mlx.generate.sampling import batch_rows, sample
    from poet_mlx.models import load_model

    model, tok, _ = load_model(spec["model"])
    topics = ["rivers", "bread", "chess", "volcanoes", "bees", "trains", "glass", "tides", "owls", "paper",
              "salt", "comets", "violins", "deserts", "coffee", "bridges"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a long story about {t}."}],
                                       add_generation_prompt=True) for t in topics]
    n = spec["max_tokens"]
    single = []
    for p in prompts[: spec.get("single_prompts", 2)]:
        tic = time.perf_counter()
        last = None
        for last in stream_generate(model, tok, p, max_tokens=n, sampler=make_sampler(spec["temperature"])):
            pass
        single.append({"tokens": last.generation_tokens, "wall_s": time.perf_counter() - tic,
                       "generation_tps": last.generation_tps, "prompt_tps": last.prompt_tps})
    batch = spec["batch_size"]
    seeds = list(range(batch))
    sample(model, tok, prompts[:2], seeds[:2], 4, spec["temperature"], batch_size=batch)  # warm-up
    runs = {}
    for length in (max(2, n // 6), n):  # a short run first: its prefill and first tokens are the full run's
        tic = time.perf_counter()
        replies = sample(model, tok, prompts[:batch], seeds, length, spec["temperature"], batch_size=batch)
        runs[length] = (time.perf_counter() - tic, sum(len(r.ids) + int(r.finished) for r in replies))
    # The default batch (`sampling.batch_rows`: up to 64 rows) on 64 replies, 4 seeds per prompt, as eval
    # --generate and pairs run when --batch-size is not given.
    many, many_seeds = prompts * 4, list(range(4 * len(prompts)))
    rows = batch_rows(model, many, n)
    tic = time.perf_counter()
    replies = sample(model, tok, many, many_seeds, n, spec["temperature"])
    default_wall, default_tokens = time.perf_counter() - tic, sum(len(r.ids) + int(r.finished) for r in replies)
    (short_wall, short_tokens), (wall, tokens) = runs[min(runs)], runs[n]
    decode_tps = (tokens - short_tokens) / (wall - short_wall)
    one = single[1:] or single
    single_tps = statistics.fmean(s["generation_tps"] for s in one)
    single_wall_tps = statistics.fmean(s["tokens"] / s["wall_s"] for s in one)
    return {"single": single, "single_generation_tps": single_tps, "single_wall_tps": single_wall_tps,
            "batched_tokens": tokens, "batched_wall_s": wall, "batched_tps": tokens / wall,
            "batched_short": {"tokens": short_tokens, "wall_s": short_wall}, "batched_decode_tps": decode_tps,
            "decode_speedup": decode_tps / single_tps, "wall_speedup": tokens / wall / single_wall_tps,
            "speedup": tokens / wall / single_tps, "default_rows": rows, "default_tokens": default_tokens,
            "default_wall_s": default_wall, "default_tps": default_tokens / default_wall,
            "default_wall_speedup": default_tokens / default_wall / single_wall_tps,
            "peak_gb": mx.get_peak_memory() / 1e9}


def run_profile(spec: dict) -> dict:
    """Where a forward pass at the step's shape (rows x length, the reference pass's work) spends its time:
    the whole forward (trunk + head at the scored positions) against its parts, each timed alone on the same
    shapes: the seven projections as bare matmuls, the attention core (RoPE + causal attention, the path
    training takes), the rest of a layer (norms, SwiGLU, residuals, reshapes), the head; "glue" is what the
    whole takes beyond the sum of its parts (dispatch, graph building, copies between ops). Also the
    forward + backward of the same rows through LoRA (the training step's compute without optimizer and
    loss bookkeeping), so the backward's share is visible.

    Spec: model (folder), rows, length, scored (head positions per row), layers (adapted, for the backward),
    calls (timed calls of each part after a warm-up; the median is kept).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from poet_mlx.head import output_head
    from poet_mlx.models import load_model

    model, _, _ = load_model(spec["model"])
    model.eval()
    rows, length, scored = spec["rows"], spec["length"], spec["scored"]
    timed = lambda fn: _timed(fn, spec.get("calls", 3))  # noqa: E731
    part = lambda fn: _timed(fn, max(5, spec.get("calls", 3)))  # noqa: E731  (a layer's parts: cheap, noisy)
    inner = model.model
    layer = inner.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    tokens = mx.random.randint(0, inner.vocab_size, (rows, length))
    x = inner.embed_tokens(tokens)
    mx.eval(x)
    heads, kv, hd = attn.n_heads, attn.n_kv_heads, attn.q_proj.weight.shape[0] // attn.n_heads
    q = mx.random.normal((rows, heads, length, hd))
    k = mx.random.normal((rows, kv, length, hd))
    v = mx.random.normal((rows, kv, length, hd))
    weights = [m.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                  mlp.up_proj, mlp.down_proj)]
    inputs = {w.shape[1]: mx.random.normal((rows * length, w.shape[1])) for w in weights}
    mx.eval(q, k, v, *inputs.values())
    n_layers = len(inner.layers)
    head = output_head(model)  # the head training uses (tied embedding or lm_head)
    if head is None:
        raise SystemExit("profile: the model's output head could not be split from its trunk")
    hs = mx.random.normal((rows * scored, x.shape[-1]))
    mx.eval(hs)

    from poet_mlx.logprobs import per_token_logps
    from poet_mlx.scoring import head_values

    targets = mx.random.randint(0, inner.vocab_size, (rows * scored,))

    def head_logps(hidden):  # (M, D) -> (M,): the reference pass's head (`scoring.head_values`)
        return head_values(head, hidden, targets, lambda lg, y: (per_token_logps(lg[None], y[None])[0],), False)[0]

    def last_hidden(m):  # (rows * scored, D): the trunk's output at the scored positions
        return m.model(tokens)[:, -scored:].reshape(-1, x.shape[-1])

    from mlx_lm.models.base import scaled_dot_product_attention as sdpa_native

    from poet_mlx.backends import fast_layers

    def attention_core():
        qr, kr = attn.rope(q), attn.rope(k)
        if fast_layers.wanted():
            return fast_layers.causal_attention(qr, kr, v, attn.scale)
        return sdpa_native(qr, kr, v, cache=None, scale=attn.scale, mask="causal")

    # Every part compiled, as the reference pass and the training step run (MLX fuses the elementwise ops,
    # which on Linux is what makes them vectorized: `backends.jit`).
    attention_c = mx.compile(attention_core)
    layer_c = mx.compile(lambda h: layer(h, "causal"))
    head_c = mx.compile(head_logps)
    forward_c = mx.compile(lambda: head_logps(last_hidden(model)), inputs=model.state)
    per_layer = {
        "projections (7 matmuls)": part(lambda: mx.eval([inputs[w.shape[1]] @ w.T for w in weights])),
        "attention core (RoPE + causal softmax(QK^T)V)": part(lambda: mx.eval(attention_c())),
    }
    whole_layer = part(lambda: mx.eval(layer_c(x)))
    per_layer["norms, SwiGLU, residuals, reshapes"] = max(0.0, whole_layer - sum(per_layer.values()))
    head_s = part(lambda: mx.eval(head_c(hs)))
    forward_s = timed(lambda: mx.eval(forward_c()))
    parts = {name: t * n_layers for name, t in per_layer.items()}
    parts["head (scored positions, log-probs)"] = head_s
    parts["glue (whole - parts: dispatch, embedding, copies)"] = max(0.0, forward_s - sum(parts.values()))

    model.freeze()
    linear_to_lora_layers(model, spec["layers"], {"rank": 8, "scale": 20.0, "dropout": 0.0})
    model.train()

    from poet_mlx.logprobs import head_token_logps

    # The training step's head and its hidden-state gradient; not compiled (a compiled step must capture the
    # model's state as its output too: the trainer's does, `benchmarks/real.py`'s step section times it).
    grad_fn = nn.value_and_grad(model, lambda: head_token_logps(head, last_hidden(model), targets).sum())
    backward_s = timed(lambda: mx.eval(grad_fn()))
    return {"rows": rows, "length": length, "scored": scored, "layers": n_layers, "adapted": spec["layers"],
            "forward_s": forward_s, "parts_s": parts, "per_layer_s": per_layer, "whole_layer_s": whole_layer,
            "forward_backward_s": backward_s, "fast_layers": fast_layers.wanted()}


def run(spec: dict) -> dict:
    return {"sgemm": run_sgemm, "step": run_step, "sample": run_sample, "profile": run_profile}[spec["mode"]](spec)


def main(argv=None) -> int:
    return child_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

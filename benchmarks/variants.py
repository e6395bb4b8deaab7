"""Before/after for each speed decision, on the same batches: poet-mlx's training step against the designs it
replaced, rebuilt here as baselines because the library no longer has them.

Variants (one fresh process each, `python -m benchmarks.variants '<json spec>'`):
- `ours`: one forward over [chosen; rejected], cached reference log-probs, chunked log-probs, length-bucketed
  batches (the library's `batch_objective` and `epoch_batches`).
- `two_forwards`: chosen and rejected in two separate forwards.
- `second_model`: a second copy of the model in memory scores the reference in every step.
- `peer_like`: both of the above, i.e. four forwards per step (mlx-lm-lora's DPO design).
- `naive_logprobs`: `log_softmax` over the whole (2B, T, V) logits, then a gather.
- `random_batches`: random batches (no length bucketing).
- `grad_checkpoint`: `ours` with every layer recomputed in the backward pass.
- `response_head` (a candidate, not in the library): the output projection and log-softmax only at the
  response positions, gathered into a packed (R, D) array (R rounded up to 128), instead of at every position
  of the padded (2B, L) batch; prompts and padding never reach the vocabulary.
The step is compiled like the trainer's (model, optimizer and random state as compile state) and does the
AdamW update with clipping. The result line reports steady-state step time, MLX peak memory and padding.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial

import poet_mlx  # noqa: F401  (first: OpenBLAS before mlx.core)

from benchmarks.report import child_main

VARIANTS = ("ours", "two_forwards", "second_model", "peer_like", "naive_logprobs", "random_batches",
            "grad_checkpoint", "response_head")
PACK_MULTIPLE = 128

_PACKED: dict = {}
"""response_head: the traced (idx, valid) of the step being traced, read by `response_head_token_logps`."""


def response_positions(starts, keep_lens, width: int):
    """Flat indices into the (2B, width) target grid of every response target, padded with index 0 (weight 0)
    to a multiple of PACK_MULTIPLE. Returns (idx (R,) int32, valid (R,) float32)."""
    import numpy as np

    idx = np.concatenate([r * width + np.arange(s, s + n) for r, (s, n) in enumerate(zip(starts, keep_lens))])
    size = -(-len(idx) // PACK_MULTIPLE) * PACK_MULTIPLE
    valid = np.zeros(size, np.float32)
    valid[: len(idx)] = 1
    return np.pad(idx, (0, size - len(idx))).astype(np.int32), valid


def response_head_token_logps(model, tokens):
    """(2B, L) -> (2B, L-1) log-probs, computed only at the packed response positions (zeros elsewhere)."""
    import mlx.core as mx

    from poet_mlx.logprobs import per_token_logps

    idx, valid = _PACKED["idx"], _PACKED["valid"]
    h = model.model(tokens[:, :-1])  # (2B, L-1, D)
    n, t1, d = h.shape
    hs = h.reshape(n * t1, d)[idx]  # (R, D)
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    logps = per_token_logps(head(hs)[None], tokens[:, 1:].reshape(-1)[idx][None])[0] * valid  # (R,)
    return mx.zeros((n * t1,), mx.float32).at[idx].add(logps).reshape(n, t1)


def naive_token_logps(logits, targets, chunk_elements=None):
    """The textbook form: a full float32 log-softmax of (N, T, V), then a gather. (N, T) float32."""
    import mlx.core as mx
    import mlx.nn as nn

    logp = nn.log_softmax(logits.astype(mx.float32), axis=-1)  # (N, T, V): the copy the library avoids
    return mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def two_forward_token_logps(model, tokens, _one=None):
    """Chosen rows and rejected rows in two model calls. (2B, L-1)."""
    import mlx.core as mx

    b = tokens.shape[0] // 2
    return mx.concatenate([_one(model, tokens[:b]), _one(model, tokens[b:])], axis=0)


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Random batches without length bucketing (the "before" of `batching.epoch_batches`)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    return [list(map(int, order[i : i + batch_size])) for i in range(0, n - batch_size + 1, batch_size)]


def _prepare(spec: dict):
    """Model with LoRA attached, tokenized pairs, layouts, and (DPO) reference per-token log-probs."""
    import mlx.core as mx

    from poet_mlx.batching import layout
    from poet_mlx.config import DataConfig
    from poet_mlx.data import load_split
    from poet_mlx.models import attach_trainable, load_model, lora_parameters
    from poet_mlx.objective import Objective
    from poet_mlx.reference import compute_token_logps
    from poet_mlx.tokenization import tokenize_pairs

    dcfg = DataConfig(data=spec["data"], max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"])
    rows, _ = load_split(dcfg, "train")
    model, tokenizer, path = load_model(spec["model"])
    pairs, _ = tokenize_pairs(rows, tokenizer, dcfg.max_length, dcfg.max_prompt_length)
    objective = Objective(loss=spec["loss"], beta=0.1 if spec["loss"] != "simpo" else 2.0)
    layouts = [layout(p, spec["poet"], 1.0, objective.needs_full_chosen) for p in pairs]
    pad_id = tokenizer.pad_token_id or 0
    ref = None
    if objective.needs_reference and not set(spec["variant"].split("+")) & {"second_model", "peer_like"}:
        ref = compute_token_logps(model, pairs, 8, pad_id)
    mx.random.seed(0)
    attach_trainable(model, "lora", spec["num_layers"], lora_parameters(8, 20.0, 0.0, None))
    return model, path, pairs, layouts, ref, objective, pad_id


def _loss_fn(spec, objective, path):
    """The objective for this variant, as f(model, tokens, starts, score_lens, keep_lens, ref)."""
    import mlx.core as mx

    from poet_mlx import objective as obj_mod
    from poet_mlx.logprobs import sequence_logps
    from poet_mlx.models import load_model

    v = set(spec["variant"].split("+"))
    if "response_head" in v:
        obj_mod.model_token_logps = response_head_token_logps

        def packed(model, tokens, starts, score_lens, keep_lens, ref, idx, valid):
            _PACKED.update(idx=idx, valid=valid)
            return obj_mod.batch_objective(model, tokens, starts, score_lens, keep_lens, ref, objective)

        return packed
    if "naive_logprobs" in v:
        obj_mod.per_token_logps = naive_token_logps
    if v & {"two_forwards", "peer_like"}:
        obj_mod.model_token_logps = partial(two_forward_token_logps, _one=obj_mod.model_token_logps)
    if not v & {"second_model", "peer_like"} or not objective.needs_reference:
        return partial(obj_mod.batch_objective, objective=objective)
    ref_model, _, _ = load_model(str(path))
    ref_model.freeze()
    ref_model.eval()

    def with_reference_model(model, tokens, starts, score_lens, keep_lens, _ref):
        ref = mx.stop_gradient(sequence_logps(obj_mod.model_token_logps(ref_model, tokens), starts, score_lens))
        return obj_mod.batch_objective(model, tokens, starts, score_lens, keep_lens, ref, objective)

    return with_reference_model


def run_variant(spec: dict) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from poet_mlx.batching import epoch_batches, make_batch, padding_fraction
    from poet_mlx.models import enable_grad_checkpoint

    model, path, pairs, layouts, ref, objective, pad_id = _prepare(spec)
    flags = set(spec["variant"].split("+"))
    if "grad_checkpoint" in flags:
        enable_grad_checkpoint(model)
    loss_fn = _loss_fn(spec, objective, path)
    lengths = [lay.tokens for lay in layouts]
    bs = spec["batch_size"]
    if "random_batches" in flags:
        batches = random_batches(len(pairs), bs, spec.get("seed", 0))
    else:
        batches = epoch_batches(lengths, bs, spec.get("seed", 0), 0)
    # Padding over a whole epoch (cheap: no model), then the first `steps` batches are trained.
    epoch_padding = float(np.mean([padding_fraction(make_batch(pairs, idx, layouts, pad_id=pad_id))
                                   for idx in batches]))
    batches = (batches * (1 + spec["steps"] // max(1, len(batches))))[: spec["steps"]]

    optimizer = optim.AdamW(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, starts, score_lens, keep_lens, ref_logps, *packed):
        (loss, _), grads = loss_and_grad(model, tokens, starts, score_lens, keep_lens, ref_logps, *packed)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    model.train()
    times, pads, tokens_fed, widths = [], [], [], set()
    for i, idx in enumerate(batches):
        tic = time.perf_counter()
        b = make_batch(pairs, idx, layouts, ref, pad_id=pad_id)
        r = b.ref_logps if b.ref_logps is not None else np.zeros(len(b.starts), np.float32)
        packed = ()
        if "response_head" in flags:
            packed = tuple(mx.array(a) for a in response_positions(b.starts, b.keep_lens, b.tokens.shape[1] - 1))
        loss = step(mx.array(b.tokens), mx.array(b.starts), mx.array(b.score_lens), mx.array(b.keep_lens),
                    mx.array(r), *packed)
        mx.eval(loss, model.state, optimizer.state)
        times.append(time.perf_counter() - tic)
        if i == 0:
            mx.reset_peak_memory()  # the steady-state peak: after the first trace and compile
        pads.append(padding_fraction(b))
        tokens_fed.append(b.tokens.size)
        widths.add(b.tokens.shape[1])
    steady = times[1:] or times
    return {
        "variant": spec["variant"],
        "steps": len(times),
        "first_step_s": times[0],
        "step_s": statistics.median(steady),
        "step_mean_s": statistics.fmean(steady),
        "peak_gb": mx.get_peak_memory() / 1e9,
        "padding_fraction": float(np.mean(pads)),
        "epoch_padding_fraction": epoch_padding,
        "padded_tokens_per_step": float(np.mean(tokens_fed)),
        "distinct_widths": len(widths),
        "final_loss": float(loss.item()),
    }


def main(argv=None) -> int:
    return child_main(run_variant, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Before/after for each speed decision, on the same batches: poet-mlx's training step against the designs it
replaced, rebuilt here as baselines because the library no longer has them.

A variant is one flag or several joined by "+" (one fresh process each, `python -m benchmarks.variants
'<json spec>'`):
- `ours`: the library's step: rows fed in length-sorted groups (`batching.make_feed`), the output head only at
  the response positions (`head.output_head`), cached reference log-probs, log-probs without a log-softmax
  copy, length-bucketed batches (`batching.epoch_batches`).
- `full_head`: logits at every position of the fed arrays (prompts and padding included), then a gather.
- `one_group`: all 2B rows in one (2B, L) array, padded to the longest.
- `plain`: both of the above: the spine's design, one forward over [chosen; rejected] with full logits.
- `two_forwards`: `plain`, with chosen and rejected in two separate forwards.
- `second_model`: `plain`, with a second copy of the model scoring the reference in every step.
- `peer_like`: both of the above, i.e. four forwards per step (mlx-lm-lora's DPO design).
- `naive_logprobs`: `log_softmax` over the whole logits, then a gather.
- `random_batches`: random batches (no length bucketing).
- `grad_checkpoint`: every layer recomputed in the backward pass.
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

VARIANTS = ("ours", "full_head", "one_group", "plain", "two_forwards", "second_model", "peer_like",
            "naive_logprobs", "random_batches", "grad_checkpoint")
IMPLIES = {"plain": {"full_head", "one_group"}, "two_forwards": {"plain"}, "second_model": {"plain"},
           "peer_like": {"two_forwards", "second_model"}}


def flags_of(variant: str) -> set:
    """The variant's flags with everything they imply (e.g. peer_like -> two_forwards, plain, full_head...)."""
    flags = set(variant.split("+"))
    while True:
        more = set().union(*(IMPLIES.get(f, set()) for f in flags)) - flags
        if not more:
            return flags
        flags |= more


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

    from poet_mlx.adapters import attach_trainable, lora_parameters
    from poet_mlx.batching import layout
    from poet_mlx.config import DataConfig, LossConfig
    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import tokenize_pairs
    from poet_mlx.models import load_model
    from poet_mlx.scoring import pair_token_logps

    dcfg = DataConfig(data=spec["data"], max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"])
    rows, _ = load_split(dcfg, "train")
    model, tokenizer, path = load_model(spec["model"])
    pairs, _ = tokenize_pairs(rows, tokenizer, dcfg.max_length, dcfg.max_prompt_length)
    objective = LossConfig(loss=spec["loss"], beta=0.1 if spec["loss"] != "simpo" else 2.0)
    layouts = [layout(p, spec["poet"], 1.0, objective.needs_full_chosen) for p in pairs]
    pad_id = tokenizer.pad_token_id or 0
    ref = None
    if objective.needs_reference and not set(spec["variant"].split("+")) & {"second_model", "peer_like"}:
        ref = pair_token_logps(model, pairs, 8, pad_id)[0]
    mx.random.seed(0)
    attach_trainable(model, "lora", spec["num_layers"], lora_parameters(8, 20.0, 0.0, None))
    return model, path, pairs, layouts, ref, objective, pad_id


def _loss_fn(flags: set, objective, path, head):
    """The objective for this variant, as f(model, *objective.batch_inputs(batch))."""
    import mlx.core as mx

    from poet_mlx import objective as obj_mod
    from poet_mlx.models import load_model

    if "naive_logprobs" in flags:
        obj_mod.per_token_logps = naive_token_logps
    if "two_forwards" in flags:
        obj_mod.model_token_logps = partial(two_forward_token_logps, _one=obj_mod.model_token_logps)
    if "second_model" not in flags or not objective.needs_reference:
        return partial(obj_mod.batch_objective, objective=objective, head=head)
    ref_model, _, _ = load_model(str(path))
    ref_model.freeze()
    ref_model.eval()

    def with_reference_model(model, groups, positions, rows, offsets, score_lens, keep_lens, _ref):
        ref_tokens = obj_mod.response_token_logps(ref_model, groups, positions)
        ref = mx.stop_gradient(obj_mod.row_sums(ref_tokens, rows, offsets, score_lens))
        return obj_mod.batch_objective(model, groups, positions, rows, offsets, score_lens, keep_lens, ref,
                                       objective, head)

    return with_reference_model


def run_variant(spec: dict) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from poet_mlx.adapters import enable_grad_checkpoint
    from poet_mlx.batching import epoch_batches, make_batch, make_feed, padding_fraction
    from poet_mlx.head import output_head
    from poet_mlx.objective import batch_inputs

    model, path, pairs, layouts, ref, objective, pad_id = _prepare(spec)
    flags = flags_of(spec["variant"])
    if "grad_checkpoint" in flags:
        enable_grad_checkpoint(model)
    head = None if "full_head" in flags else output_head(model)
    halves = "one_group" not in flags
    loss_fn = _loss_fn(flags, objective, path, head)
    lengths = [lay.tokens for lay in layouts]
    bs = spec["batch_size"]
    if "random_batches" in flags:
        batches = random_batches(len(pairs), bs, spec.get("seed", 0))
    else:
        batches = epoch_batches(lengths, bs, spec.get("seed", 0), 0)
    # Padding over a whole epoch (cheap: no model), then the first `steps` batches are trained.
    epoch_padding = float(np.mean([padding_fraction(make_batch(pairs, idx, layouts, pad_id=pad_id), halves)
                                   for idx in batches]))
    batches = (batches * (1 + spec["steps"] // max(1, len(batches))))[: spec["steps"]]

    optimizer = optim.AdamW(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*inputs):
        (loss, _), grads = loss_and_grad(model, *inputs)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    model.train()
    times, pads, tokens_fed, shapes = [], [], [], set()
    for i, idx in enumerate(batches):
        tic = time.perf_counter()
        b = make_batch(pairs, idx, layouts, ref, pad_id=pad_id)
        inputs = batch_inputs(b, halves=halves)
        loss = step(*inputs)
        mx.eval(loss, model.state, optimizer.state)
        times.append(time.perf_counter() - tic)
        if i == 0:
            mx.reset_peak_memory()  # the steady-state peak: after the first trace and compile
        pads.append(padding_fraction(b, halves))
        tokens_fed.append(make_feed(b, halves=halves).fed_tokens)
        shapes.add(tuple(g.shape for g in inputs[0]) + (inputs[1].shape,))
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
        "distinct_shapes": len(shapes),
        "head_at_responses": head is not None,
        "final_loss": float(loss.item()),
    }


def main(argv=None) -> int:
    return child_main(run_variant, argv)


if __name__ == "__main__":
    sys.exit(main())

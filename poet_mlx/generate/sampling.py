"""Sampling replies from a model: batched with a KV cache (mlx-lm's `BatchGenerator`), seeded per reply.

One forward per generated token serves a whole batch of replies, so on a CPU, where a 135M model writes ~5
tokens/s one reply at a time, sixteen replies cost little more than one (`benchmarks/`). Each reply draws its
tokens from its own random key (`SeededSampler`), so a reply depends only on its prompt, its seed and the
model: not on the other prompts of the batch, the batch size or the order. Two equal models give equal
replies, which makes base-vs-aligned comparisons reply by reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

BATCH_SIZE = 64
"""Most replies generated together (one forward per token for all of them), when the KV cache fits
`KV_BUDGET_BYTES` (`batch_rows`). On the CPU a decoding step reads every weight whatever the rows, so more
rows cost little more: SmolLM2-135M fp32, 64 replies of up to 64 tokens (2 cores, alternating rounds): batch
16 53.3-53.7 s, 32 42.6-46.7 s, 64 31.0-36.1 s, the same replies token for token; in a later run with
prompts prefilled `PREFILL_ROWS` at a time, batch 16 59.3-61.2 s against 32.8-43.0 s by default."""
PREFILL_ROWS = 16
"""Prompts prefilled together: a prefill's logits are (rows, prompt tokens, vocabulary), about 0.6 GB for 16
prompts of 200 tokens at SmolLM2's 49,152 words in float32."""
KV_BUDGET_BYTES = 1 << 30
"""The KV cache a default batch may fill (keys and values of every layer for every row's prompt and reply)."""


@dataclass
class Reply:
    """One sampled reply: its text (decoded from `ids`), token ids without the stop token, and whether it
    ended with a stop token (False: cut at max_tokens)."""

    text: str
    ids: list
    finished: bool


class SeededSampler:
    """Draws one reply's tokens from its own key: token t uses the t-th split of `mx.random.key(seed)`.

    Called by mlx-lm once per generated token with that reply's (1, V) log-probs; temperature scales them,
    top_p < 1 keeps the smallest set of tokens whose probability reaches top_p (mlx-lm's `apply_top_p`).
    """

    def __init__(self, seed: int, temperature: float, top_p: float = 1.0):
        import mlx.core as mx

        self.key = mx.random.key(seed)
        self.temperature, self.top_p = temperature, top_p
        self.inverse_temperature = mx.array(1.0 / temperature, mx.float32)

    def __call__(self, logprobs):
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p

        self.key, draw = mx.random.split(self.key)
        if self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        return gumbel_max_draw(logprobs, draw, self.inverse_temperature)


def _gumbel_max(logprobs, key, inverse_temperature):
    import mlx.core as mx

    noise = mx.random.gumbel(logprobs.shape, key=key)
    return mx.argmax(logprobs * inverse_temperature + noise, axis=-1)


@lru_cache(maxsize=None)
def _compiled_gumbel_max():
    import mlx.core as mx

    return mx.compile(_gumbel_max)


def gumbel_max_draw(logprobs, key, inverse_temperature):
    """Token ids drawn from softmax(logprobs * inverse_temperature), one per row: `mx.random.categorical`'s
    Gumbel-max draw, compiled so that the noise's two logs and the sum are one fused, vectorized kernel (on
    the CPU, 16 rows of SmolLM2's 49,152 logits: 18 -> 13 ms a token, most of the rest is the random bits).

    Gumbel-max rather than an inverse CDF (one uniform per row, cheaper): a draw by cumulative sums flips to
    a neighbouring token when the logits change by rounding (batch size, padding), about 2 x 1e-7 x V of the
    draws (1% at V = 49,152); Gumbel-max flips only when the two largest perturbed logits tie to rounding.

    Args:
        logprobs: (N, V) log-probabilities or logits; -inf marks excluded tokens.
        key: the random key of this draw.
        inverse_temperature: 1 / temperature, a scalar array.

    Returns:
        (N,) uint32 token ids.
    """
    return _compiled_gumbel_max()(logprobs, key, inverse_temperature)


def kv_bytes_per_token(model) -> Optional[int]:
    """Bytes of keys and values one token adds to the cache: 2 x layers x KV heads x head size x the activations'
    itemsize (that of the model's first float parameter, e.g. a norm's weight). None for an architecture whose
    config does not say (a default batch is then `BATCH_SIZE` // 2)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    args = getattr(model, "args", None)
    layers = getattr(model, "layers", None)
    heads = getattr(args, "num_attention_heads", None)
    hidden = getattr(args, "hidden_size", None)
    if args is None or not layers or not heads or not hidden:
        return None
    kv = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or hidden // heads
    floats = (v.dtype.size for _, v in tree_flatten(model.parameters())
              if v.dtype in (mx.float32, mx.float16, mx.bfloat16))
    return 2 * len(layers) * kv * head_dim * next(floats, 4)


def batch_rows(model, prompts: Sequence[Sequence[int]], max_tokens: int) -> int:
    """The default batch: `BATCH_SIZE` rows, fewer when their KV cache (longest prompt + max_tokens per row)
    would pass `KV_BUDGET_BYTES`; at least 1, at most the number of prompts."""
    per_token = kv_bytes_per_token(model)
    longest = max((len(p) for p in prompts), default=0) + max_tokens
    rows = BATCH_SIZE // 2 if per_token is None else KV_BUDGET_BYTES // max(1, per_token * longest)
    return max(1, min(BATCH_SIZE, rows, len(prompts)))


def stop_tokens(tokenizer) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS ids (mlx-lm reads them from generation_config.json too)."""
    ids = getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]
    return sorted({int(i) for i in ids if i is not None})


def sample(model, tokenizer, prompts: Sequence[Sequence[int]], seeds: Sequence[int], max_tokens: int,
           temperature: float, top_p: float = 1.0, progress: Optional[Callable[[int, int], None]] = None,
           batch_size: Optional[int] = None) -> list[Reply]:
    """Sample one reply per prompt, `batch_size` at a time (None: `batch_rows`), new prompts joining as replies
    finish; prompts are prefilled `PREFILL_ROWS` at a time.

    Args:
        prompts: token ids of each prompt, as training sees them (chat template included); may repeat (several
            samples of one prompt need different seeds).
        seeds: one per prompt (see `SeededSampler`); ignored when temperature is 0 (greedy).
        temperature: 0 is greedy; top_p < 1 adds nucleus sampling.
        progress: progress(replies done, replies) as replies finish.

    Returns:
        One Reply per prompt, in input order.
    """
    from mlx_lm.generate import BatchGenerator

    from ..backends.fast_quant import expanded

    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    stops = stop_tokens(tokenizer)
    rows = batch_size or batch_rows(model, prompts, max_tokens)
    samplers = None if temperature == 0 else [SeededSampler(s, temperature, top_p) for s in seeds]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        # 4-bit layers on Linux: weights expanded to float32 once for the whole run, not at every decoding step.
        with expanded(model):
            gen = BatchGenerator(model, stop_tokens=[[t] for t in stops], completion_batch_size=rows,
                                 prefill_batch_size=min(rows, PREFILL_ROWS))
            try:
                return _collect(gen, tokenizer, prompts, max_tokens, samplers, progress)
            finally:
                gen.close()
    finally:
        model.train(was_training)


def _collect(gen, tokenizer, prompts, max_tokens: int, samplers, progress) -> list[Reply]:
    """Run a BatchGenerator over the prompts to the end: one Reply per prompt, in input order."""
    out: list = [None] * len(prompts)
    uids = gen.insert([list(map(int, p)) for p in prompts], [max_tokens] * len(prompts), samplers=samplers)
    where = {uid: i for i, uid in enumerate(uids)}
    tokens = {uid: [] for uid in uids}
    done = 0
    while responses := gen.next_generated():
        for r in responses:
            if r.finish_reason == "stop":  # the stop token itself is not part of the reply
                out[where[r.uid]] = Reply(tokenizer.decode(tokens[r.uid]), tokens[r.uid], True)
            else:
                tokens[r.uid].append(int(r.token))
                if r.finish_reason is not None:
                    out[where[r.uid]] = Reply(tokenizer.decode(tokens[r.uid]), tokens[r.uid], False)
            if r.finish_reason is not None:
                done += 1
                if progress:
                    progress(done, len(prompts))
    return out


def sample_replies(model, tokenizer, prompts: Sequence[np.ndarray], max_tokens: int, temperature: float,
                   seed: int, top_p: float = 1.0, progress: Optional[Callable[[int, int], None]] = None,
                   batch_size: Optional[int] = None) -> list[tuple[str, list, bool]]:
    """`sample` with prompt i seeded `seed + i`: per prompt (text, token ids without the stop token, finished)."""
    replies = sample(model, tokenizer, prompts, [seed + i for i in range(len(prompts))], max_tokens, temperature,
                     top_p, progress, batch_size)
    return [(r.text, r.ids, r.finished) for r in replies]

"""Sampling replies from a model through mlx-lm, seeded per prompt so that runs can be compared reply by reply."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np


def sample_replies(model, tokenizer, prompts: Sequence[np.ndarray], max_tokens: int, temperature: float,
                   seed: int, top_p: float = 1.0,
                   progress: Optional[Callable[[int, int], None]] = None) -> list[tuple[str, list, bool]]:
    """Sample one reply per prompt with mlx-lm's `stream_generate`.

    Args:
        prompts: token ids of each prompt, as training sees them (chat template included).
        temperature: 0 is greedy; top_p < 1 adds nucleus sampling.
        seed: prompt i is sampled after `mx.random.seed(seed + i)`, so its reply does not depend on the
            other prompts and two equal models give equal replies.

    Returns:
        Per prompt (text, token ids without the EOS, finished): finished is True when the reply ended with
        an EOS token, False when it was cut at `max_tokens`.
    """
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    model.eval()
    out = []
    for i, ids in enumerate(prompts):
        mx.random.seed(seed + i)
        tokens, finished = [], False
        for r in stream_generate(model, tokenizer, mx.array(np.asarray(ids, np.int32)), max_tokens=max_tokens,
                                 sampler=sampler):
            if r.finish_reason == "stop" and r.token in eos:
                finished = True
            elif r.token is not None:
                tokens.append(int(r.token))
        # Decode the ids rather than joining streamed segments: the same text the judge and the JSONL get.
        out.append((tokenizer.decode(tokens), tokens, finished))
        if progress:
            progress(i + 1, len(prompts))
    return out

"""The model split into its trunk and its output head, so the vocabulary is only computed where it is scored.

A preference step needs next-token log-probs at the response positions only; prompts and padding (0.5 of the
(2B, L) token array on the benchmark's data) never need the (.., V) logits. mlx-lm's causal LMs compute
`logits = head(model.model(tokens))`, with `head` the `lm_head` or the tied `embed_tokens.as_linear`. Some
architectures do more (Gemma 2's logit soft-capping, Cohere's logit scale, ...), so the split is trusted only
after a probe: the split forward must reproduce the model's own logits on a few tokens, and never for a config
that transforms the logits after the head (`LOGIT_TRANSFORMS`). Anything else (an
unknown wrapper, a model whose trunk wants other arguments) falls back to the full forward, which is always
correct, only slower.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

PROBE_TOKENS = 8
PROBE_RTOL = 1e-4
"""Tolerance of the probe, relative to the largest logit: the two paths run the same kernels, so they
normally agree bit for bit; a soft-capped or rescaled head misses by orders of magnitude more."""

Head = Callable[[mx.array], mx.array]
"""(M, D) hidden states -> (M, V) logits."""


def _candidate(model) -> tuple[object, Optional[Head]]:
    """(the module that holds the head, the head) or (None, None)."""
    trunk = getattr(model, "model", None)
    if trunk is None or not callable(trunk):
        return None, None
    head = getattr(model, "lm_head", None)
    if head is not None and callable(head):
        return head, head
    embed = getattr(trunk, "embed_tokens", None)
    if embed is not None and hasattr(embed, "as_linear"):
        return embed, embed.as_linear
    return None, None


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config keys of architectures that transform the logits after the head (Gemma 2's soft-cap, Cohere's and
Granite's scales). Such a model is refused before any probe: on a model whose logits are near zero (a fresh
or tiny one) a soft-cap is nearly the identity, so the probe could pass, and its verdict stays cached."""


def transforms_logits(model) -> Optional[str]:
    """The first LOGIT_TRANSFORMS key set (not None) in the model's config (`model.args`), or None."""
    args = getattr(model, "args", None)
    return next((key for key in LOGIT_TRANSFORMS if getattr(args, key, None) is not None), None)


def output_head(model) -> Optional[Head]:
    """The model's output head if `model(x) == head(model.model(x))`, checked on a short probe; else None.
    A model whose config transforms the logits after the head (`LOGIT_TRANSFORMS`) gets None without a probe.

    The probe runs in eval mode (dropout off) and restores the previous mode. Its verdict is kept on the
    model for as long as the head module stays the same object (a probe of a 4-bit model on Linux expands
    every weight once: seconds on a CPU).
    """
    owner, head = _candidate(model)
    if head is None or transforms_logits(model):
        return None
    cached = getattr(model, "_poet_head_probe", None)
    if cached is not None and cached[0] is owner:
        return head if cached[1] else None
    agree = _probe(model, head)
    object.__setattr__(model, "_poet_head_probe", (owner, agree))
    return head if agree else None


def head_is_frozen(model) -> bool:
    """Whether the module holding the model's output head (`lm_head`, or the tied `embed_tokens`) has no
    trainable parameters, so that a training step may skip its weight gradient (`logprobs.head_token_logps`).
    False when there is no such module."""
    from mlx.utils import tree_flatten

    owner, _ = _candidate(model)
    return owner is not None and not tree_flatten(owner.trainable_parameters())


def _probe(model, head) -> bool:
    """One forward of a few tokens, its trunk output recorded on the way (a 4-bit model on Linux expands all
    its weights per forward, so a second forward would double the probe's cost)."""
    trunk = model.model
    base, seen = type(trunk), []

    def recording_call(self, *args, **kwargs):
        out = base.__call__(self, *args, **kwargs)
        # The split calls the trunk with the tokens alone: anything else passed here (a mask, images...) that
        # is not None would be missing there, so such a call is recorded as unusable (None).
        extra = list(args[1:]) + list(kwargs.values())
        seen.append(out if all(v is None for v in extra) else None)
        return out

    was_training = getattr(model, "training", False)
    model.eval()
    trunk.__class__ = type(f"Recorded{base.__name__}", (base,), {"__call__": recording_call})
    try:
        vocab = _vocab_size(model)
        probe = (mx.arange(PROBE_TOKENS, dtype=mx.int32) * 7919 % max(1, vocab))[None]  # (1, PROBE_TOKENS)
        full = model(probe).astype(mx.float32)
        if len(seen) != 1 or seen[0] is None:  # not called once, with the tokens alone: not head(trunk(x))
            return False
        split = head(seen[0]).astype(mx.float32)
        if full.shape != split.shape:
            return False
        scale = max(float(mx.abs(full).max().item()), 1e-6)
        return float(mx.abs(full - split).max().item()) <= PROBE_RTOL * scale
    except Exception:  # any architecture the split does not fit uses the full forward
        return False
    finally:
        trunk.__class__ = base
        model.train(was_training)


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None)
    if vocab:
        return int(vocab)
    embed = getattr(model.model, "embed_tokens", None)
    weight = getattr(embed, "weight", None)
    return int(weight.shape[0]) if weight is not None else 2

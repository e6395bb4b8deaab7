"""Matmul FLOPs of a LoRA preference step and of the reference pass on a llama-style model (counted, not
measured), so that a step's achieved FLOP/s can be set against the machine's sgemm rate.

Every matmul counts 2*M*N*K. For one row fed L positions (prompt + kept response, minus the last token),
R of them scored by the head (the kept response tokens), with n_layers layers of which the last n_adapted
carry LoRA of rank r on every linear layer:
- forward, every layer: 2 L P, P = d (H hd + 2 KV hd) + H hd d + 3 d f (q, k, v, o, gate, up, down);
  attention: 2 * 2 H hd * L (L + 1) / 2 (scores and values, the causal half: what is needed);
- the head (tied or not) at the R scored positions only: 2 R d V;
- backward (training only): the input-gradients of every adapted layer, 2 L P each, less the q/k/v input
  gradient of the lowest adapted layer (nothing below it needs it); attention's backward, 2x its forward, in
  the adapted layers; the head's input-gradient, 2 R d V; frozen weights get no weight-gradient;
- LoRA: x A then (x A) B per adapted projection, 2 L r (in + out) forward, and twice that backward
  (input- and weight-gradients), so 3x in all.
Padding and the masked half of attention are work the kernels may do, but they are not counted: the rate
is useful FLOPs per second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, folder) -> "Shape":
        c = json.loads((Path(folder) / "config.json").read_text())
        heads = c["num_attention_heads"]
        return cls(c["hidden_size"], c["num_hidden_layers"], heads, c.get("num_key_value_heads", heads),
                   c.get("head_dim") or c["hidden_size"] // heads, c["intermediate_size"], c["vocab_size"])

    @property
    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down."""
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]

    @property
    def layer_params(self) -> int:
        return sum(i * o for i, o in self.projections)


def row_flops(shape: Shape, length: int, scored: int, adapted: int, rank: int, train: bool) -> dict:
    """FLOPs of one row, by part (see the module docstring). `length`: positions fed; `scored`: head rows."""
    s, L = shape, length
    attn = 2 * 2 * s.heads * s.head_dim * L * (L + 1) / 2  # one layer, forward
    lora = sum(2 * L * rank * (i + o) for i, o in s.projections)  # one layer, forward
    out = {"layers_forward": 2 * L * s.layer_params * s.layers, "attention_forward": attn * s.layers,
           "head_forward": 2 * scored * s.hidden * s.vocab, "lora": lora * adapted}
    if train and adapted:
        qkv_in = 2 * L * sum(i * o for i, o in s.projections[:3])
        out.update({"layers_backward": 2 * L * s.layer_params * adapted - qkv_in,
                    "attention_backward": 2 * attn * adapted, "head_backward": 2 * scored * s.hidden * s.vocab,
                    "lora": 3 * lora * adapted})
    return out


def total(parts: list[dict]) -> dict:
    """Sum of `row_flops` dicts, part by part, with "total"."""
    keys = sorted({k for p in parts for k in p})
    out = {k: float(sum(p.get(k, 0) for p in parts)) for k in keys}
    out["total"] = sum(out.values())
    return out

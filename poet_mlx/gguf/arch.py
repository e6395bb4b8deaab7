"""Per architecture: GGUF metadata -> mlx-lm config.json, GGUF tensor names -> mlx-lm parameter names, and
the undoing of llama.cpp's weight transforms.

The transforms are those of llama.cpp's `convert_hf_to_gguf.py`:
- llama (also Mistral, SmolLM, ... whose GGUF architecture is "llama"): the q and k projection rows are
  permuted within each head from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one
  (`LlamaModel.permute`); undone here, so the weights are Hugging Face's and mlx-lm's
  (`rope_traditional: false`). qwen2, qwen3, gemma3 and phi3 use llama.cpp's NeoX RoPE: no permutation.
- gemma3: every `*norm.weight` is stored plus 1 (Gemma's RMSNorm multiplies by 1 + w); 1 is subtracted.
- phi3: q/k/v and gate/up are stored fused (`attn_qkv`, `ffn_up` holding gate then up), as mlx-lm's phi3
  wants them; separately stored parts are fused here.
- llama 3.x RoPE scaling is stored as a `rope_freqs` tensor of per-frequency factors; its parameters are
  recovered (and checked by recomputing the tensor); phi3's LongRoPE factors come as two tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .reader import GGUFError, GGUFFile

_COMMON_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA3_LAYER = {
    **_COMMON_LAYER, **_QK_NORM,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
"""Tensors that become config.json settings, not weights."""


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture maps onto one mlx-lm model."""

    model_type: str  # mlx-lm's module name / config "model_type"
    hf_class: str  # config "architectures", for tools that read it (transformers, PEFT export)
    layer_names: Dict[str, str]  # GGUF per-layer stem -> mlx-lm stem under model.layers.N.
    config: Callable[["Facts"], dict]
    permute_qk: bool = False
    norm_shift: float = 0.0
    fuse: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # mlx stem <- GGUF stems, concatenated


@dataclass
class Facts:
    """What every architecture's config needs, read once from the metadata and the tensor index."""

    gf: GGUFFile
    arch: str
    tensor_names: List[str]
    vocab_size: int
    tied: bool
    rope_freqs: Optional[np.ndarray] = None  # llama 3 rope factors, when stored
    rope_long: Optional[np.ndarray] = None  # phi3 LongRoPE factors
    rope_short: Optional[np.ndarray] = None

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def get(self, name: str, default=None):
        return self.gf.get(self.key(name), default)

    def need(self, name: str):
        return self.gf.require(self.key(name))

    def scalar(self, name: str, default=None):
        """A per-model integer setting; per-layer arrays must be uniform (mlx-lm's models have one value)."""
        value = self.get(name, default) if default is not None else self.need(name)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise GGUFError(f"{self.gf.path.name}: '{self.key(name)}' varies per layer ({sorted(set(value))}); "
                                f"mlx-lm's {self.arch} model needs one value")
            value = value[0]
        return int(value)

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_names


def clean_float(x) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores float32: 1e-5 is 9.99999974738e-06)."""
    return float(str(np.float32(x)))


def head_dim(f: Facts) -> int:
    hidden, heads = f.scalar("embedding_length"), f.scalar("attention.head_count")
    return int(f.get("attention.key_length", hidden // heads))


def _base_config(f: Facts, spec_type: str) -> dict:
    heads = f.scalar("attention.head_count")
    return {
        "model_type": spec_type,
        "hidden_size": f.scalar("embedding_length"),
        "num_hidden_layers": f.scalar("block_count"),
        "intermediate_size": f.scalar("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": f.scalar("attention.head_count_kv", heads),
        "rms_norm_eps": clean_float(f.need("attention.layer_norm_rms_epsilon")),
        "vocab_size": f.vocab_size,
        "max_position_embeddings": f.scalar("context_length", 4096),
        # llama.cpp's default when the key is absent (each arch's converter writes it when the model has it)
        "rope_theta": clean_float(f.get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": f.tied,
    }


def rope_scaling(f: Facts) -> Optional[dict]:
    """config "rope_scaling" from `{arch}.rope.scaling.*` keys (linear, yarn), or None."""
    kind = str(f.get("rope.scaling.type", "none") or "none").lower()
    if kind in ("none", ""):
        return None
    factor = clean_float(f.need("rope.scaling.factor"))
    if kind == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"type": "yarn", "rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": f.scalar("rope.scaling.original_context_length")}
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (v := f.get(f"rope.scaling.{gguf_key}")) is not None:
                out[hf_key] = clean_float(v)
        return out
    raise GGUFError(f"{f.gf.path.name}: RoPE scaling type '{kind}' ({f.key('rope.scaling.type')}) is not supported "
                    "for this architecture (supported: linear, yarn)")


def _llama3_factors(dim: int, base: float, p: dict) -> np.ndarray:
    """llama 3's per-frequency RoPE divisors, as llama.cpp's converter computes them."""
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    lo_wl = p["original_max_position_embeddings"] / p["low_freq_factor"]
    hi_wl = p["original_max_position_embeddings"] / p["high_freq_factor"]
    smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
        p["high_freq_factor"] - p["low_freq_factor"])
    mid = 1.0 / ((1 - smooth) / p["factor"] + smooth)
    return np.where(wavelen < hi_wl, 1.0, np.where(wavelen > lo_wl, p["factor"], mid))


def llama3_rope_scaling(f: Facts, dim: int, base: float) -> dict:
    """Recover llama 3 RoPE scaling parameters from the `rope_freqs` tensor (one divisor per frequency).

    Only the ratios are identifiable (original context and both frequency factors scale together), so the
    original context is fixed (the file's, else llama 3's 8192) and the factors fitted from the smoothly
    interpolated frequencies. The result is checked by recomputing the tensor.
    """
    r = f.rope_freqs.astype(np.float64).reshape(-1)
    factor = float(r.max())
    ctx = int(f.get("rope.scaling.original_context_length", 8192) or 8192)
    params = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": ctx}
    inv_wavelen = (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)) / (2 * math.pi)
    mid = (r > 1 + 1e-6) & (r < factor - 1e-6)
    if factor > 1 and mid.sum() >= 2:
        smooth = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv_wavelen[mid], smooth, 1)  # smooth = ctx/(hf-lf) * (1/wavelen) - lf/(hf-lf)
        span = ctx / a
        params["low_freq_factor"] = clean_float(-b * span)
        params["high_freq_factor"] = clean_float(-b * span + span)
    if len(r) != dim // 2 or not np.allclose(_llama3_factors(dim, base, params), r, rtol=1e-3, atol=1e-4):
        raise GGUFError(f"{f.gf.path.name}: the rope_freqs tensor does not follow llama 3 RoPE scaling; "
                        "poet-mlx cannot convert this RoPE variant")
    return {"type": "llama3", "rope_type": "llama3", **{k: clean_float(v) if isinstance(v, float) else v
                                                         for k, v in params.items()}}


def llama_config(f: Facts) -> dict:
    cfg = _base_config(f, "llama")
    hd = head_dim(f)
    cfg.update(head_dim=hd, rope_traditional=False,
               attention_bias=f.has_tensor("blk.0.attn_q.bias"), mlp_bias=f.has_tensor("blk.0.ffn_up.bias"))
    if f.rope_freqs is not None:
        cfg["rope_scaling"] = llama3_rope_scaling(f, int(f.get("rope.dimension_count", hd)), cfg["rope_theta"])
    elif (rs := rope_scaling(f)) is not None:
        cfg["rope_scaling"] = rs
    return cfg


def qwen2_config(f: Facts) -> dict:
    cfg = _base_config(f, "qwen2")
    if (rs := rope_scaling(f)) is not None:
        cfg["rope_scaling"] = rs
    return cfg


def qwen3_config(f: Facts) -> dict:
    cfg = _base_config(f, "qwen3")
    cfg["head_dim"] = head_dim(f)
    if (rs := rope_scaling(f)) is not None:
        cfg["rope_scaling"] = rs
    return cfg


def _gemma3_pattern(f: Facts) -> int:
    """Gemma 3's sliding-window pattern n (layer i is global iff (i + 1) % n == 0); llama.cpp's default 6."""
    value = f.get("attention.sliding_window_pattern", 6)
    if not isinstance(value, list):
        return int(value)
    for n in range(1, len(value) + 1):  # a per-layer is-sliding array: find the period it follows
        if all(bool(v) == ((i + 1) % n != 0) for i, v in enumerate(value)):
            return n
    raise GGUFError(f"{f.gf.path.name}: '{f.key('attention.sliding_window_pattern')}' is not periodic; mlx-lm's "
                    "gemma3 needs every n-th layer global")


def gemma3_config(f: Facts) -> dict:
    cfg = _base_config(f, "gemma3_text")
    hd = head_dim(f)
    window = int(f.get("attention.sliding_window", 0) or 0)
    if float(f.get("final_logit_softcapping", 0.0) or 0.0) != 0.0:
        raise GGUFError(f"{f.gf.path.name}: gemma3 with final logit soft-capping is not supported by mlx-lm's "
                        "gemma3_text")
    layers = cfg["num_hidden_layers"]
    # llama.cpp (gemma3.cpp): 27B (62 layers) scales queries by hidden / heads, the others by head_dim
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else hd
    # gemma3_text itself ties when the weights have no lm_head; the key is kept for other readers
    cfg.update(head_dim=hd, query_pre_attn_scalar=scalar,
               rope_local_base_freq=clean_float(f.get("rope.freq_base_swa", 10000.0)),
               sliding_window=window if window > 0 else cfg["max_position_embeddings"],
               sliding_window_pattern=_gemma3_pattern(f) if window > 0 else 1)
    if (rs := rope_scaling(f)) is not None:
        cfg["rope_scaling"] = rs
    return cfg


def phi3_config(f: Facts) -> dict:
    cfg = _base_config(f, "phi3")
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    rope_dims = int(f.get("rope.dimension_count", hd))
    cfg["partial_rotary_factor"] = rope_dims / hd
    cfg["original_max_position_embeddings"] = int(f.get("rope.scaling.original_context_length",
                                                        cfg["max_position_embeddings"]))
    if f.rope_long is not None:
        short = f.rope_short if f.rope_short is not None else f.rope_long
        cfg["rope_scaling"] = {"type": "longrope", "rope_type": "longrope",
                               "long_factor": [clean_float(x) for x in f.rope_long.reshape(-1)],
                               "short_factor": [clean_float(x) for x in short.reshape(-1)]}
    elif (rs := rope_scaling(f)) is not None and rs["type"] == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": rs["factor"], "long_factor": 1.0}
    elif rs is not None:
        raise GGUFError(f"{f.gf.path.name}: phi3 RoPE scaling '{rs['type']}' is not supported by mlx-lm's phi3")
    return cfg


ARCHITECTURES: Dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "LlamaForCausalLM", _COMMON_LAYER, llama_config, permute_qk=True),
    "qwen2": ArchSpec("qwen2", "Qwen2ForCausalLM", _COMMON_LAYER, qwen2_config),
    "qwen3": ArchSpec("qwen3", "Qwen3ForCausalLM", {**_COMMON_LAYER, **_QK_NORM}, qwen3_config),
    "gemma3": ArchSpec("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_LAYER, gemma3_config, norm_shift=1.0),
    "phi3": ArchSpec("phi3", "Phi3ForCausalLM", _PHI3_LAYER, phi3_config,
                     fuse={"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
                           "mlp.gate_up_proj": ("ffn_gate", "ffn_up")}),
}
"""GGUF `general.architecture` -> spec. Mistral's GGUFs say "llama"."""


def spec_for(gf: GGUFFile) -> ArchSpec:
    """The spec of the file's architecture; a GGUFError naming it (and the supported ones) otherwise."""
    arch = gf.arch
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{gf.path.name}: architecture '{arch or '(none)'}' is not supported (supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}; Mistral's GGUFs are 'llama')")
    return ARCHITECTURES[arch]


_LAYER_RE = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([A-Za-z0-9_]+)\.(weight|bias)$")


def mlx_name(spec: ArchSpec, gguf_name: str) -> Optional[str]:
    """The mlx-lm parameter name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj
    .weight"), or None when the architecture has no such tensor."""
    if m := _LAYER_RE.match(gguf_name):
        stem = spec.layer_names.get(m.group(2))
        return None if stem is None else f"model.layers.{m.group(1)}.{stem}.{m.group(3)}"
    if m := _GLOBAL_RE.match(gguf_name):
        stem = GLOBAL_TENSORS.get(m.group(1))
        return None if stem is None else f"{stem}.{m.group(2)}"
    return None


def fused_parts(spec: ArchSpec, gguf_name: str, names) -> Optional[Tuple[str, int, int]]:
    """For a tensor that is one part of a fused mlx-lm weight: (mlx name, part index, number of parts).

    A fusion applies only when the file has every part (`names`: the file's tensor names): phi3's
    `ffn_up` is the fused gate/up weight itself unless an `ffn_gate` sits next to it."""
    m = _LAYER_RE.match(gguf_name)
    if not m:
        return None
    layer, stem, suffix = m.groups()
    for target, parts in spec.fuse.items():
        if stem in parts and all(f"blk.{layer}.{p}.{suffix}" in names for p in parts):
            return f"model.layers.{layer}.{target}.{suffix}", parts.index(stem), len(parts)
    return None


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's q/k permutation: hf_rows = gguf_rows[perm].

    llama.cpp writes, within each head of `rows // n_head` rows, row (s * half + i) of Hugging Face's
    rotate-half layout (s in {0, 1}, i < half) at position (2 * i + s): the interleaved layout.
    """
    if rows % (2 * n_head):
        raise GGUFError(f"cannot undo the q/k permutation: {rows} rows are not {n_head} heads of even size")
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


def permute_heads(spec: ArchSpec, gguf_name: str, f: Facts) -> Optional[int]:
    """The head count to un-permute a tensor's rows with (q: heads, k: kv heads), or None."""
    if not spec.permute_qk:
        return None
    m = _LAYER_RE.match(gguf_name)
    if not m or m.group(2) not in ("attn_q", "attn_k"):
        return None
    heads = f.scalar("attention.head_count")
    return heads if m.group(2) == "attn_q" else f.scalar("attention.head_count_kv", heads)


def shifts_norm(spec: ArchSpec, gguf_name: str) -> bool:
    return spec.norm_shift != 0.0 and gguf_name.endswith("norm.weight")

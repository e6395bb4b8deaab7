"""What the benchmark trains on: a synthetic preference set and model folders with random weights.

Both are generated in code, offline, and cached under the benchmark's work folder, so a rerun skips the build.

Data: prompts of 8-40 words and responses whose lengths are drawn independently, log-uniformly between
30 and 200 words, so chosen and rejected differ in length the way real preference data does (what POET cuts).
Words come from a seeded pseudo-word vocabulary with Zipf frequencies; the tokenizer (a byte-level BPE trained
on the same texts) maps frequent words to one token and rare ones to two or three, so a word is ~1.2 tokens.

Models (random weights; `mlx_lm.load` reads the folders like downloaded ones, and so does mlx-lm-lora):
- `tiny-7.6M`: llama, hidden 256, 4 layers, 8 heads / 4 kv heads, MLP 1024, vocabulary 7168: 7.60M params,
  float32 (the issue's "tiny test llama").
- `llama-25M`: llama, hidden 512, 6 layers, 8 / 4 heads, MLP 1408, vocabulary 7168: 25.0M params, float32.
- `qwen2.5-0.5b-4bit`: Qwen2.5-0.5B's shapes (qwen2, hidden 896, 24 layers, 14 / 2 heads, MLP 4864,
  vocabulary 151936, tied embeddings, q/k/v biases), bfloat16, 4-bit affine group 64 like mlx-community's
  conversion; `layers` can be lowered to fit the time budget on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zu", "pe", "da", "fi", "go", "hu", "ja", "be",
             "ro", "ni", "te", "wa", "xi", "yo", "ce", "mu", "li", "on", "ar", "el", "is", "um")


@dataclass(frozen=True)
class DataSpec:
    """A synthetic preference set: `pairs` rows, lengths in words (~1.2 tokens each)."""

    pairs: int = 256
    prompt_words: tuple[int, int] = (8, 40)
    response_words: tuple[int, int] = (30, 200)
    vocab_words: int = 3000
    seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool = False
    dtype: str = "float32"
    quant_bits: Optional[int] = None
    group_size: int = 64
    rope_theta: float = 10000.0
    tokenizer_vocab: int = 4096
    seed: int = 0

    @property
    def params(self) -> int:
        """Parameter count (unquantized): embeddings, attention, MLP, norms (and q/k/v biases for qwen2)."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        if self.model_type == "qwen2":
            attn += self.hidden + 2 * kv
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        head = 0 if self.tie else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * layer + self.hidden + head


MODELS = {
    "tiny-7.6M": ModelSpec("tiny-7.6M", "llama", 256, 4, 8, 4, 1024, 7168),
    "llama-25M": ModelSpec("llama-25M", "llama", 512, 6, 8, 4, 1408, 7168),
    "qwen2.5-0.5b-4bit": ModelSpec("qwen2.5-0.5b-4bit", "qwen2", 896, 24, 14, 2, 4864, 151936, tie=True,
                                   dtype="bfloat16", quant_bits=4, group_size=64, rope_theta=1e6),
}


def _words(n: int, rng: random.Random) -> list[str]:
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _sentence_text(words: list[str], weights: list[float], n: int, rng: random.Random) -> str:
    """`n` Zipf-drawn words, with a period every 8-16 words."""
    picked = rng.choices(words, weights=weights, k=n)
    parts, until = [], rng.randint(8, 16)
    for i, w in enumerate(picked):
        until -= 1
        end = i == n - 1 or until == 0
        parts.append(w + ("." if end else ""))
        if until == 0:
            until = rng.randint(8, 16)
    return " ".join(parts)


def _log_uniform(lo: int, hi: int, rng: random.Random) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def make_rows(spec: DataSpec) -> list[dict]:
    """`spec.pairs` rows `{"prompt", "chosen", "rejected"}` (TRL's standard format), deterministic in spec."""
    rng = random.Random(spec.seed)
    words = _words(spec.vocab_words, rng)
    weights = [1.0 / (r + 1) ** 1.1 for r in range(len(words))]
    rows = []
    for _ in range(spec.pairs):
        p = rng.randint(*spec.prompt_words)
        c, r = (_log_uniform(*spec.response_words, rng) for _ in range(2))
        rows.append({"prompt": _sentence_text(words, weights, p, rng) + "?",
                     "chosen": _sentence_text(words, weights, c, rng),
                     "rejected": _sentence_text(words, weights, r, rng)})
    return rows


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_folder(root: Path, spec: DataSpec) -> Path:
    """A folder with train.jsonl (the format both poet-mlx and mlx-lm-lora read), built once."""
    out = Path(root) / f"data-{spec.pairs}-{_key(asdict(spec))}"
    if not (out / "train.jsonl").is_file():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "train.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in make_rows(spec)))
        tmp.replace(out / "train.jsonl")
    return out


def _config(spec: ModelSpec, tokenizer_vocab: int) -> dict:
    from poet_mlx.demo import tiny

    head_dim = spec.hidden // spec.heads
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if spec.model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": head_dim,
        "intermediate_size": spec.intermediate,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6 if spec.model_type == "qwen2" else 1e-5,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": 4096,
        "vocab_size": max(spec.vocab, tokenizer_vocab),
        "tie_word_embeddings": spec.tie,
        "bos_token_id": tiny.SPECIAL_TOKENS.index(tiny.BOS),
        "eos_token_id": tiny.SPECIAL_TOKENS.index(tiny.END),
        "pad_token_id": tiny.SPECIAL_TOKENS.index(tiny.PAD),
        "torch_dtype": spec.dtype,
    }
    if spec.model_type == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False})
    return cfg


def _write_tokenizer(out: Path, texts: list[str], vocab: int) -> int:
    from poet_mlx.demo import tiny

    tok = tiny.build_tokenizer(texts, vocab)
    tok.save(str(out / "tokenizer.json"))
    extra = [tiny.EOS_TEXT, tiny.SYSTEM, tiny.USER, tiny.ASSISTANT]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tiny.BOS, "eos_token": tiny.END,
        "pad_token": tiny.PAD, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "padding_side": "right",
        "additional_special_tokens": extra, "chat_template": tiny.CHAT_TEMPLATE}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": tiny.BOS, "eos_token": tiny.END, "pad_token": tiny.PAD,
        "additional_special_tokens": extra}, indent=2))
    return tok.get_vocab_size()


def _random_weights(model, seed: int, dtype) -> None:
    """Seeded normal weights with ~unit-scale activations (std 1/sqrt(fan_in)); norms at 1, biases at 0."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    new = []
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])):
        if name.endswith("norm.weight"):
            w = mx.ones(p.shape)
        elif name.endswith(".bias"):
            w = mx.zeros(p.shape)
        else:
            std = 0.5 if "embed_tokens" in name else 1.0 / math.sqrt(p.shape[-1])
            w = std * mx.random.normal(p.shape, key=mx.random.key(seed * 1_000_003 + i))
        new.append((name, w.astype(dtype)))
        mx.eval(new[-1][1])
    model.update(tree_unflatten(new))


def model_folder(root: Path, spec: ModelSpec, data: DataSpec) -> Path:
    """Build (once) the model folder for `spec`, its tokenizer trained on `data`'s texts."""
    out = Path(root) / f"model-{spec.name}-{spec.layers}L-{_key(asdict(spec), asdict(data))}"
    if (out / "model.safetensors").is_file():
        return out
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama, qwen2
    from mlx_lm.utils import save_config

    out.mkdir(parents=True, exist_ok=True)
    texts = [t for row in make_rows(data) for t in row.values()]
    tok_vocab = _write_tokenizer(out, texts, spec.tokenizer_vocab)
    config = _config(spec, tok_vocab)
    module = qwen2 if spec.model_type == "qwen2" else llama
    model = module.Model(module.ModelArgs.from_dict(config))
    _random_weights(model, spec.seed, getattr(mx, spec.dtype))
    if spec.quant_bits:
        nn.quantize(model, group_size=spec.group_size, bits=spec.quant_bits, mode="affine")
        config["quantization"] = {"group_size": spec.group_size, "bits": spec.quant_bits, "mode": "affine"}
    weights = dict(sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]))
    tmp = out / "model.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    save_config(dict(config), out / "config.json")
    tmp.replace(out / "model.safetensors")  # last: its presence marks a complete folder
    return out


def model_spec(name: str, layers: Optional[int] = None) -> ModelSpec:
    spec = MODELS[name]
    return replace(spec, layers=layers) if layers else spec

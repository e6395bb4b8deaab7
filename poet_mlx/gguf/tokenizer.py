"""A Hugging Face tokenizer (tokenizer.json, tokenizer_config.json) rebuilt from GGUF metadata.

The target is llama.cpp's behaviour for the same file, since that is how the GGUF's author ran it:
- `tokenizer.ggml.model` "gpt2": byte-level BPE with the stored merges. Text is first split by the regexes
  llama.cpp uses for `tokenizer.ggml.pre` (applied one after another, each splitting the pieces of the last,
  exactly as llama.cpp's `llm_tokenizer_bpe` does), then byte-mapped. SmolLM's "smollm" splits every digit
  off before GPT-2's regex, so "a  1" is ["a", "ĠĠ", "1"], where plain GPT-2 splitting gives ["a", "Ġ", "Ġ1"].
- "llama": SentencePiece BPE. llama.cpp merges the adjacent pair whose merged piece has the highest score;
  that is a BPE whose merge ranks are the pieces' scores, with byte fallback (`<0xNN>` tokens), spaces
  written as "▁", and "▁" prefixed to each text run when `add_space_prefix`.
- Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens: both
  are matched in text before any splitting, as in llama.cpp.
- A stored `tokenizer.huggingface.json` is used as it is.

Unknown `tokenizer.ggml.pre` names: the conversion still succeeds with GPT-2's splitting, and says so in a
`GGUFWarning` (also recorded in config.json), because the weights are right and the difference is limited to
how some runs of digits, spaces and punctuation split; pass `strict=True` to get a GGUFError instead.

End-of-generation ids follow llama.cpp too: eos, eot and eom ids, plus control tokens whose text is a
known end marker (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<end_of_turn>`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .reader import GGUFError, GGUFFile

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's treatment of one `tokenizer.ggml.pre` family."""

    regexes: Tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is itself in the vocabulary is taken whole
    clean_spaces: bool = True  # decoding drops spaces before punctuation (HF clean_up_tokenization_spaces)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = PreTokenizer((GPT2_REGEX,))
_SMOLLM = PreTokenizer((r"\p{N}", GPT2_REGEX), clean_spaces=False)
_LLAMA3 = PreTokenizer((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((QWEN2_REGEX,), clean_spaces=False)

PRE_TOKENIZERS: Dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3_REGEX,))),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "a.x-4.0",
                     "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "exaone4", "roberta-bpe",
                     "jina-v1-en", "jina-v2-code"), _GPT2),
    **dict.fromkeys(("smollm", "command-r"), _SMOLLM),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva-7b"),
                    PreTokenizer((r"\p{N}", GPT2_REGEX))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "hunyuan"), _QWEN2),
    "stablelm2": PreTokenizer((QWEN2_REGEX,)),
    "qwen35": PreTokenizer((QWEN35_REGEX,), clean_spaces=False),
    **dict.fromkeys(("chatglm-bpe",), PreTokenizer((LLAMA3_REGEX,))),
    **dict.fromkeys(("glm4", "glm5"), PreTokenizer((LLAMA3_REGEX,), ignore_merges=True)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), PreTokenizer((GPT4O_REGEX,), clean_spaces=False)),
    "tekken": PreTokenizer((TEKKEN_REGEX,), ignore_merges=True, clean_spaces=False, add_bos=True),
    "deepseek-coder": PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
                                   clean_spaces=False),
}
"""`tokenizer.ggml.pre` -> how llama.cpp (src/llama-vocab.cpp) splits text. Regexes are the original
Hugging Face ones where llama.cpp rewrote them for its own engine (e.g. `(?i:'s|...)`)."""

END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                     "<|eom_id|>", "<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
"""Token texts llama.cpp treats as end of generation when present (src/llama-vocab.cpp)."""

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    """The GGUF vocabulary: tokens in id order, their types (1..6 as above) and special ids."""

    model: str
    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]]
    merges: Optional[List[str]]
    pre: Optional[str]
    special: Dict[str, int] = field(default_factory=dict)  # bos, eos, eot, eom, unk, pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True

    def text(self, name: str) -> Optional[str]:
        i = self.special.get(name)
        return self.tokens[i] if i is not None else None


def read_vocab(gf: GGUFFile) -> Vocab:
    """Read the `tokenizer.ggml.*` metadata; a GGUFError when it is missing or of an unsupported model."""
    model = gf.get("tokenizer.ggml.model")
    if model is None:
        raise GGUFError(f"{gf.path.name} has no tokenizer (tokenizer.ggml.model is missing); poet-mlx needs the "
                        "vocabulary in the GGUF")
    if model not in ("gpt2", "llama"):
        raise GGUFError(f"{gf.path.name}: tokenizer model '{model}' is not supported (supported: gpt2 = byte-level "
                        "BPE, llama = SentencePiece BPE)")
    tokens = gf.strings("tokenizer.ggml.tokens") or []
    types = gf.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = gf.get("tokenizer.ggml.scores")
    for key, values in (("token_type", types), ("scores", scores)):
        if values is not None and len(values) != len(tokens):
            raise GGUFError(f"{gf.path.name}: tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} tokens; "
                            "the file is corrupt")
    special = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                      ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        value = gf.get(f"tokenizer.ggml.{key}")
        if value is not None and 0 <= int(value) < len(tokens):
            special[name] = int(value)
    pre = gf.get("tokenizer.ggml.pre")
    default_bos = model == "llama" or (pre in PRE_TOKENIZERS and PRE_TOKENIZERS[pre].add_bos)
    return Vocab(model=model, tokens=tokens, types=_control_types(tokens, types, special),
                 scores=scores, merges=gf.strings("tokenizer.ggml.merges"), pre=pre,
                 special=special, add_bos=bool(gf.get("tokenizer.ggml.add_bos_token", default_bos)),
                 add_eos=bool(gf.get("tokenizer.ggml.add_eos_token", False)),
                 add_space_prefix=bool(gf.get("tokenizer.ggml.add_space_prefix", model == "llama")))


def _control_types(tokens: List[str], types: list, special: Dict[str, int]) -> List[int]:
    """Token types, with the bos/eos/eot/eom tokens and end-of-generation texts marked control when the
    file calls them normal (llama.cpp overrides those too), so they are matched whole, never split."""
    out = [int(t) for t in types]
    marked = {special[k] for k in ("bos", "eos", "eot", "eom") if k in special}
    marked.update(i for i, t in enumerate(tokens) if t in END_OF_GENERATION)
    for i in marked:
        if out[i] == NORMAL:
            out[i] = CONTROL
    return out


def eos_token_ids(v: Vocab) -> List[int]:
    """End-of-generation ids, the file's eos first (llama.cpp's rule; see the module docstring)."""
    ids = [v.special[k] for k in ("eos", "eot", "eom") if k in v.special]
    for i, (tok, typ) in enumerate(zip(v.tokens, v.types, strict=True)):
        if tok in END_OF_GENERATION and typ in (CONTROL, USER_DEFINED):
            ids.append(i)
    return list(dict.fromkeys(ids))


def _unique_vocab(tokens: List[str], warnings: List[str]) -> Dict[str, int]:
    """token -> id. A repeated token text (a few GGUFs have them) keeps its first id; later copies get a
    placeholder text so every id still exists (they are never produced by encoding)."""
    vocab: Dict[str, int] = {}
    dups = 0
    for i, tok in enumerate(tokens):
        if tok in vocab:
            tok, dups = f"<poet_mlx_duplicate_{i}>", dups + 1
        vocab[tok] = i
    if dups:
        warnings.append(f"{dups} repeated token text(s) in the vocabulary got placeholder names")
    return vocab


def _bpe_merges(v: Vocab, vocab: Dict[str, int], warnings: List[str]) -> List[Tuple[str, str]]:
    merges, bad = [], 0
    for m in v.merges or []:
        pair = _split_merge(m, vocab)
        if pair is None:
            bad += 1
        else:
            merges.append(pair)
    if bad:
        warnings.append(f"{bad} merge(s) name tokens missing from the vocabulary and were dropped")
    return merges


def _split_merge(merge: str, vocab: Dict[str, int]) -> Optional[Tuple[str, str]]:
    """"a b" -> ("a", "b"); a token holding a space itself is resolved by the vocabulary."""
    parts = merge.split(" ")
    if len(parts) == 2:
        a, b = parts
        return (a, b) if a in vocab and b in vocab and a + b in vocab else None
    for k in range(1, len(parts)):
        a, b = " ".join(parts[:k]), " ".join(parts[k:])
        if a in vocab and b in vocab and a + b in vocab:
            return a, b
    return None


def spm_merges(v: Vocab, vocab: Dict[str, int]) -> List[Tuple[str, str]]:
    """SentencePiece BPE as merges: every split (a, b) of a normal piece into two normal pieces, ranked by the
    merged piece's score (highest first; ties by id), which is the order llama.cpp's SPM tokenizer merges in."""
    normal = {t for t, typ in zip(v.tokens, v.types, strict=True) if typ == NORMAL}
    scores = v.scores or [-(i + 0.0) for i in range(len(v.tokens))]
    ranked = []
    for i, (tok, typ) in enumerate(zip(v.tokens, v.types, strict=True)):
        if typ != NORMAL or len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in normal and b in normal:
                ranked.append((-float(scores[i]), i, k, a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _added_tokens(v: Vocab):
    from tokenizers import AddedToken

    special, plain = [], []
    for tok, typ in zip(v.tokens, v.types, strict=True):
        if typ in (CONTROL, UNKNOWN) or (typ == USER_DEFINED and tok in END_OF_GENERATION):
            special.append(AddedToken(tok, special=True, normalized=False))
        elif typ == USER_DEFINED:
            plain.append(AddedToken(tok, special=False, normalized=False))
    return special, plain


def _post_processor(v: Vocab):
    """BOS/EOS insertion as `add_bos_token`/`add_eos_token` say; byte-level offsets otherwise."""
    from tokenizers import processors

    bos = v.text("bos") if v.add_bos else None
    eos = v.text("eos") if v.add_eos else None
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False) if v.model == "gpt2" else None

    def around(seq: str) -> list:
        return ([bos] if bos else []) + [seq] + ([eos] if eos else [])

    specials = {t: v.special[k] for k, t in (("bos", bos), ("eos", eos)) if t is not None}
    return processors.TemplateProcessing(single=around("$A"), pair=around("$A") + around("$B:1"),
                                         special_tokens=list(specials.items()))


def pre_tokenizer_for(v: Vocab, warnings: List[str], strict: bool) -> PreTokenizer:
    """The llama.cpp splitting for `v.pre`; unknown names fall back to GPT-2's (with a warning) or raise."""
    if v.pre in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[v.pre]
    if v.pre in (None, ""):
        warnings.append("the GGUF names no pre-tokenizer (tokenizer.ggml.pre); using llama.cpp's 'default' "
                        "splitting, as llama.cpp does")
        return _DEFAULT
    message = (f"pre-tokenizer '{v.pre}' (tokenizer.ggml.pre) is unknown to poet-mlx; text is split like GPT-2 "
               "instead, so some runs of digits, spaces or punctuation may tokenize differently than in llama.cpp")
    if strict:
        raise GGUFError(message + f"; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    warnings.append(message)
    return _GPT2


def _gpt2_tokenizer(v: Vocab, warnings: List[str], strict: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pt = pre_tokenizer_for(v, warnings, strict)
    vocab = _unique_vocab(v.tokens, warnings)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(v, vocab, warnings), ignore_merges=pt.ignore_merges,
                               fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in pt.regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, pt.clean_spaces


def _spm_tokenizer(v: Vocab, warnings: List[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = _unique_vocab(v.tokens, warnings)
    unk = v.text("unk")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(v, vocab), unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if v.add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if v.add_space_prefix else []))
    return tok, False


def build_tokenizer_json(gf: GGUFFile, v: Vocab, warnings: List[str], *, strict: bool = False) -> Tuple[str, bool]:
    """tokenizer.json text for the file's vocabulary, and whether decoding cleans up spaces."""
    stored = gf.get("tokenizer.huggingface.json")
    if stored:
        return str(stored), False
    if not v.tokens:
        raise GGUFError(f"{gf.path.name}: tokenizer.ggml.tokens is missing or empty")
    if v.model == "gpt2":
        if not v.merges:
            raise GGUFError(f"{gf.path.name}: a gpt2 (BPE) tokenizer without tokenizer.ggml.merges")
        tok, clean = _gpt2_tokenizer(v, warnings, strict)
    else:
        tok, clean = _spm_tokenizer(v, warnings)
    special, plain = _added_tokens(v)
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    if (post := _post_processor(v)) is not None:
        tok.post_processor = post
    return tok.to_str(), clean


def chat_templates(gf: GGUFFile):
    """`tokenizer.chat_template` (a string), or with named extra templates a list of {name, template}."""
    main = gf.get("tokenizer.chat_template")
    names = gf.get("tokenizer.chat_templates") or []
    named = [{"name": n, "template": gf.get(f"tokenizer.chat_template.{n}")} for n in names
             if gf.get(f"tokenizer.chat_template.{n}")]
    if not named:
        return main
    return ([{"name": "default", "template": main}] if main else []) + named


def tokenizer_config(gf: GGUFFile, v: Vocab, clean_spaces: bool, context_length: int) -> dict:
    """tokenizer_config.json: what transformers' AutoTokenizer (under mlx-lm) needs beyond tokenizer.json."""
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": v.text("bos"),
        "eos_token": v.text("eos"),
        "unk_token": v.text("unk"),
        "pad_token": v.text("pad"),
        "add_bos_token": v.add_bos,
        "add_eos_token": v.add_eos,
        "clean_up_tokenization_spaces": clean_spaces,
        "model_max_length": int(context_length),
    }
    if (template := chat_templates(gf)) is not None:
        cfg["chat_template"] = template
    return cfg


QWEN2_COMPATIBLE = ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "hunyuan", "stablelm2")


def _transformers_override(gf: GGUFFile, v: Vocab, warnings: List[str]) -> None:
    """transformers 5 loads every model_type "qwen2" folder with its Qwen2Tokenizer, which rebuilds the
    splitting (NFC, then Qwen2's regex) from the vocabulary and ignores tokenizer.json's. For Qwen2's own
    vocabularies that is llama.cpp's "qwen2" splitting plus NFC normalization; say so for anything else."""
    if gf.arch == "qwen2" and not (v.model == "gpt2" and v.pre in QWEN2_COMPATIBLE):
        warnings.append(f"transformers replaces this {v.model}/{v.pre} tokenizer's text splitting with Qwen2's "
                        "(model_type qwen2), so tokenization may differ from llama.cpp's")


def tokenizer_files(gf: GGUFFile, context_length: int, warnings: List[str], *,
                    strict: bool = False) -> Tuple[Dict[str, str], Vocab]:
    """{file name: text} for tokenizer.json and tokenizer_config.json, and the vocabulary read."""
    v = read_vocab(gf)
    _transformers_override(gf, v, warnings)
    text, clean = build_tokenizer_json(gf, v, warnings, strict=strict)
    cfg = tokenizer_config(gf, v, clean, context_length)
    return {"tokenizer.json": text, "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"}, v

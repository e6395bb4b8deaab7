"""Code-checkable instruction-following constraints (IFEval-style) and a judge that needs no second model.

A constraint is a plain dict, `{"kind": "word_max", "n": 20}`, JSON-friendly so it can sit in a dataset row.
Each kind (`KINDS`) has one canonical instruction sentence (`Kind.template`, e.g. "Answer in at most {n}
words."), a seeded generator of its parameters (`Kind.draw(rng)`), an exact checker (`Kind.check`) and a tag
`decided_by` saying which part of a reply settles the verdict:

- "opening": a prefix of the reply, a few tokens long whatever the reply's length, settles it (starts with a
  phrase, its first word, a <<title>> first). POET, which cuts both replies of a pair to the shorter one's
  token length, keeps this signal.
- "end": only the last few tokens settle it (ends with a phrase, ends with a question, a final P.S.
  paragraph). This is the signal POET's truncation can cut away: the longer reply's end is not scored.
  A reply cut at the sampler's max_tokens has no real end and fails these: count unfinished replies apart.
- "whole": every part of the reply can break it, or it is a count over the reply (no commas, lowercase,
  word/sentence/bullet/paragraph counts, keywords anywhere, a forbidden word). Counts are length-like, and
  the truncated pair has equal lengths. JSON and "wrapped in quotes" are "whole" too: a reply is rejected by
  prose before the `{` (opening) as surely as by a missing `}` (end); neither end alone decides it.

The judge sees only the prompt TEXT (the project's judge interface is `f(prompt, reply) -> float`), so every
template doubles as a regex (`parse_constraints`): `render` and the parser are built from the same string,
which makes the round trip exact. `judge` scores the fraction of the prompt's constraints met.

Definitions every checker uses (on the reply with surrounding whitespace stripped, "\\r\\n" read as "\\n"):
- word: a run of letters/digits, with inner apostrophes ("don't" is one word; "well-known" and "3.5" are
  two, so a forbidden "very" is found in "very-good"). Markdown marks (`-`, `*`, `#`, `<<`) are not words.
  Words, phrases and keywords compare case-blind (so "lowercase" can share a prompt with "Okay.").
- sentence: a piece ended by `.`, `!` or `?` (runs like "..." or "?!" count once, closing quotes or
  brackets may follow) before whitespace or the end of the text, or by a line break; only pieces holding a
  word count. So each bullet or title line is a sentence, and "e.g. this" is two (kept simple on purpose).
- bullet: a line whose first non-blank character is `-`, `*` or `+` followed by a space or tab and text
  (markdown's unordered items; numbered items do not count).
- paragraph: a block of lines holding text, separated from the next by at least one blank line.
- a question's end: "?" (maybe followed by "!"), then only closing quotes, brackets or markdown `*`/`_`.
- A reply with no word at all meets no constraint: otherwise an empty reply would pass every "do not"
  constraint and win best-of-N preference pairs.

No third-party library is used: the IFEval verifier ports on PyPI (if-verifiable, lm-eval's ifeval task)
need NLTK's punkt data, which is not on PyPI and fails offline, and check "lowercase" with langdetect,
which rejects short English ("a nice cat" reads as Romanian).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

DECIDED_BY = ("opening", "end", "whole")

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|\n")
_BULLET = re.compile(r"^[ \t]*[-*+][ \t]+\S", re.MULTILINE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def clean(reply: str) -> str:
    """The text checkers read: line ends as "\\n", surrounding whitespace stripped."""
    return reply.replace("\r\n", "\n").replace("\r", "\n").strip()


def words(text: str) -> list[str]:
    """The words of `text`, lowercased (see the module docstring for what a word is)."""
    return [w.lower() for w in _WORD.findall(text)]


def sentences(text: str) -> list[str]:
    """The sentences of `text` that hold a word, stripped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if _WORD.search(s)]


def bullets(text: str) -> int:
    """How many lines of `text` are markdown bullet items."""
    return len(_BULLET.findall(text))


def paragraphs(text: str) -> list[str]:
    """The blank-line-separated blocks of `text` that hold non-blank text, stripped."""
    return [b.strip() for b in _BLANK_LINE.split(clean(text)) if b.strip()]


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _starts_with(text: str, phrase: str) -> bool:
    """Case-blind, whitespace-collapsed prefix test that does not cut a word ("In short" is no prefix of
    "In shortly")."""
    t, p = _norm(text), _norm(phrase)
    return t.startswith(p) and not (p[-1:].isalnum() and t[len(p) : len(p) + 1].isalnum())


def _ends_with(text: str, phrase: str) -> bool:
    t, p = _norm(text), _norm(phrase)
    return t.endswith(p) and not (p[:1].isalnum() and t[: len(t) - len(p)][-1:].isalnum())


_JSON_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*)\n[ \t]*```", re.DOTALL | re.IGNORECASE)


def _is_json_object(text: str) -> bool:
    """A non-empty JSON object, bare or as the only thing in one ``` / ```json code block (small chat models
    fence JSON by habit; IFEval accepts the fence too)."""
    fenced = _JSON_FENCE.fullmatch(text)
    try:
        value = json.loads(fenced[1] if fenced else text)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return False
    return isinstance(value, dict) and bool(value)


def _has_postscript(text: str) -> bool:
    last = paragraphs(text)[-1]
    return last.lower().startswith("p.s.") and bool(words(last[4:]))


# --------------------------------------------------------------------------------------- template fields
# Each field: (regex for the parser, parse the matched text, render the value). A template's "{name}" is a
# field; the rest of the template is literal text, escaped for the regex.
_FIELDS: dict[str, tuple[str, Callable[[str], object], Callable[[object], str]]] = {
    "n": (r"\d+", int, str),
    "phrase": (r'[^"\n]+', str, str),
    "word": (r'[^"\s]+', str, str),
    "words": (r'the words? "[^"\n]+"(?: and "[^"\n]+")*', lambda s: re.findall(r'"([^"\n]+)"', s),
              lambda ws: ("the word " if len(ws) == 1 else "the words ") + " and ".join(f'"{w}"' for w in ws)),
}
_FIELD_REF = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Kind:
    """One constraint kind.

    Attributes:
        name: the "kind" value of its constraint dicts.
        decided_by: "opening", "end" or "whole" (module docstring).
        template: the canonical instruction sentence; each "{field}" is a parameter (see `_FIELDS`).
        check: `check(text, constraint) -> bool` on `clean(reply)`; `check_constraint` is the public door.
        draw: `draw(rng) -> params` (the constraint dict without "kind").
        groups: kinds sharing a group are never put in one prompt: they would contradict (two openings) or
            make each other near impossible (bullets and a sentence limit).
    """

    name: str
    decided_by: str
    template: str
    check: Callable[[str, dict], bool]
    draw: Callable[[random.Random], dict]
    groups: frozenset

    @cached_property
    def fields(self) -> list[str]:
        return _FIELD_REF.findall(self.template)

    @cached_property
    def pattern(self) -> re.Pattern:
        parts = _FIELD_REF.split(self.template)  # literal, field, literal, field, ..., literal
        return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELDS[p][0]})"
                                  for i, p in enumerate(parts)))


# Phrase banks. No phrase holds a comma (a prompt may also say "no commas") and the forbidden words appear
# in no other bank, so two constraints of one prompt never contradict (tests check both).
START_PHRASES = ("Here is my answer:", "Sure thing!", "Let me explain.", "Good question!", "In short",
                 "Once upon a time", "My answer is simple.", "Okay.", "Great idea!", "To begin with")
END_PHRASES = ("I hope this helps.", "That is all.", "Thank you for reading.", "The end.", "Have a nice day!",
               "Stay curious!", "Any other questions?", "Enjoy!", "Good luck!", "See you soon.")
FIRST_WORDS = ("Yes", "Well", "Today", "Imagine", "First", "Honestly", "Sometimes", "Once", "Wow", "Okay")
KEYWORDS = ("blue", "river", "happy", "window", "music", "gentle", "morning", "friend", "light", "simple",
            "garden", "journey", "quiet", "warm", "story", "green")
FORBIDDEN_WORDS = ("very", "really", "also", "just", "many", "because", "important", "always", "like", "most")


def _pick(**choices: Sequence) -> Callable[[random.Random], dict]:
    """A draw that picks each field from its choices, in the order given (so draws are reproducible)."""
    return lambda rng: {k: rng.choice(v) for k, v in choices.items()}


def _kind(name, decided_by, template, check, draw=lambda rng: {}, groups=()) -> Kind:
    return Kind(name, decided_by, template, check, draw, frozenset(groups))


# Parameter ranges were set from samples of SmolLM2-135M-Instruct (temperature 0.7, 200-256 new tokens), so
# that pass rates sit between 0 and 1 where the model can follow at all: it writes 100-200 words unasked,
# hence no word_min under 60. In 4-10 samples per kind it never met lowercase, no_commas, ends_with, quoted.
_KINDS = (
    _kind("word_max", "whole", "Answer in at most {n} words.",
          lambda t, c: len(words(t)) <= c["n"], _pick(n=(10, 15, 20, 25, 30, 40, 50)), ["length"]),
    _kind("word_min", "whole", "Answer in at least {n} words.",
          lambda t, c: len(words(t)) >= c["n"], _pick(n=(60, 80, 100, 150)), ["length"]),
    _kind("sentence_max", "whole", "Answer in at most {n} sentences.",
          lambda t, c: len(sentences(t)) <= c["n"], _pick(n=(2, 3, 4)), ["length", "sentences"]),
    _kind("sentence_min", "whole", "Answer in at least {n} sentences.",
          lambda t, c: len(sentences(t)) >= c["n"], _pick(n=(4, 6, 8, 10)), ["length", "sentences"]),
    _kind("lowercase", "whole", "Write your whole reply in lowercase letters, with no capital letters at all.",
          lambda t, c: t == t.lower()),
    _kind("no_commas", "whole", "Do not use any commas in your reply.",
          lambda t, c: "," not in t and "，" not in t, groups=["commas"]),
    _kind("starts_with", "opening", 'Start your reply with the exact words "{phrase}".',
          lambda t, c: _starts_with(t, c["phrase"]), _pick(phrase=START_PHRASES), ["opening"]),
    _kind("first_word", "opening", 'Make "{word}" the first word of your reply.',
          lambda t, c: words(t)[0] == c["word"].lower(), _pick(word=FIRST_WORDS), ["opening"]),
    _kind("title", "opening", "Start your reply with a title in double angular brackets, such as <<My Title>>.",
          lambda t, c: bool(re.match(r"<<[^<>\n]*[^\W_][^<>\n]*>>", t)), groups=["opening", "paragraphs"]),
    _kind("ends_with", "end", 'End your reply with the exact words "{phrase}".',
          lambda t, c: _ends_with(t, c["phrase"]), _pick(phrase=END_PHRASES), ["ending"]),
    _kind("end_question", "end", "End your reply with a question.",
          lambda t, c: bool(re.search(r"\?[!?]*$", t.rstrip("\"'”’)*_ \n"))), groups=["ending"]),
    _kind("postscript", "end", 'End your reply with a postscript: a last paragraph starting with "P.S.".',
          lambda t, c: _has_postscript(t), groups=["ending", "paragraphs"]),
    _kind("keywords", "whole", "Include {words} in your reply.",
          lambda t, c: set(w.lower() for w in c["words"]) <= set(words(t)),
          lambda rng: {"words": rng.sample(KEYWORDS, rng.randint(1, 2))}),
    _kind("forbidden_word", "whole", 'Do not use the word "{word}" anywhere in your reply.',
          lambda t, c: c["word"].lower() not in words(t), _pick(word=FORBIDDEN_WORDS)),
    _kind("bullets", "whole", 'Answer with exactly {n} bullet points, each on its own line starting with "- ".',
          lambda t, c: bullets(t) == c["n"], _pick(n=(2, 3, 4, 5)), ["layout", "sentences"]),
    _kind("paragraphs", "whole", "Write exactly {n} paragraphs, separated by blank lines.",
          lambda t, c: len(paragraphs(t)) == c["n"], _pick(n=(2, 3, 4)), ["layout", "sentences", "paragraphs"]),
    # A JSON object needs commas between members and has no prose opening, ending or layout.
    _kind("json", "whole", "Reply with a JSON object only (a ```json code block is fine), with no other text.",
          lambda t, c: _is_json_object(t), groups=["opening", "ending", "layout", "sentences", "commas"]),
    _kind("quoted", "whole", "Wrap your entire reply in double quotation marks.",
          lambda t, c: len(t) >= 2 and t[0] in '"“' and t[-1] in '"”', groups=["opening", "ending", "layout"]),
)
KINDS: dict[str, Kind] = {k.name: k for k in _KINDS}
"""Every constraint kind by name, in a fixed order."""


def kinds_decided_by(tag: str) -> list[str]:
    """The names of the kinds whose `decided_by` is `tag` ("opening", "end" or "whole")."""
    if tag not in DECIDED_BY:
        raise ValueError(f"decided_by must be one of {', '.join(DECIDED_BY)}, got {tag!r}")
    return [k.name for k in _KINDS if k.decided_by == tag]


def _kind_of(constraint: dict) -> Kind:
    try:
        return KINDS[constraint["kind"]]
    except (KeyError, TypeError):
        raise ValueError(f"not a constraint: {constraint!r}; expected a dict whose 'kind' is one of "
                         f"{', '.join(KINDS)}") from None


def draw(kind: str, rng: random.Random) -> dict:
    """A constraint of `kind` with parameters drawn from `rng`."""
    return {"kind": kind, **_kind_of({"kind": kind}).draw(rng)}


def compatible(a: str, b: str) -> bool:
    """Whether kinds `a` and `b` may share a prompt (distinct kinds, no common group)."""
    return a != b and not (KINDS[a].groups & KINDS[b].groups)


def render(constraint: dict) -> str:
    """The canonical instruction sentence of `constraint`."""
    kind = _kind_of(constraint)
    return _FIELD_REF.sub(lambda m: _FIELDS[m[1]][2](constraint[m[1]]), kind.template)


def render_prompt(task: str, constraints: Sequence[dict]) -> str:
    """The prompt text: the base task, then each constraint's instruction sentence, space-separated."""
    return " ".join([task.strip(), *(render(c) for c in constraints)])


def parse_constraints(prompt: str) -> list[dict]:
    """The constraints whose canonical sentences appear in `prompt`, in order of appearance ([] if none).

    The inverse of `render_prompt` for any task text that holds no instruction sentence itself."""
    found = []
    for kind in _KINDS:
        for m in kind.pattern.finditer(prompt):
            params = {f: _FIELDS[f][1](m[f]) for f in kind.fields}
            found.append((m.start(), {"kind": kind.name, **params}))
    return [c for _, c in sorted(found, key=lambda item: item[0])]


def check_constraint(constraint: dict, reply: str) -> bool:
    """Whether `reply` meets `constraint` (a reply with no word meets none)."""
    kind, text = _kind_of(constraint), clean(reply)
    return bool(words(text)) and bool(kind.check(text, constraint))


def check_constraints(constraints: Sequence[dict], reply: str) -> list[bool]:
    """`check_constraint` for each constraint, in order."""
    return [check_constraint(c, reply) for c in constraints]


def checker(constraint: dict) -> Callable[[str], bool]:
    """`check(reply) -> bool` for one constraint."""
    _kind_of(constraint)  # fail now, not on the first reply
    return lambda reply: check_constraint(constraint, reply)


def judge(prompt: str, reply: str) -> float:
    """The fraction of the prompt's constraints that `reply` meets, in [0, 1] (module:function judge).

    Raises:
        ValueError: `prompt` holds no canonical instruction sentence (it was not built by this module).
    """
    constraints = parse_constraints(prompt)
    if not constraints:
        shown = prompt if len(prompt) <= 200 else prompt[:200] + "..."
        raise ValueError(f"no recognizable constraint in prompt {shown!r}: poet_mlx.analysis.constraints:judge only "
                         "scores prompts built by render_prompt/build_prompts (canonical instruction sentences)")
    met = check_constraints(constraints, reply)
    return sum(met) / len(met)


def breakdown(items: Iterable[tuple[Sequence[dict], str]]) -> dict:
    """Pass rates over `(constraints, reply)` pairs.

    Returns:
        {"replies": R, "all_met": share of replies meeting all their constraints, "constraints": C,
         "pass_rate": share of the C constraints met, "by_kind": {kind: {"n", "pass_rate"}},
         "by_decided_by": {tag: {"n", "pass_rate"}}}; rates are None where n is 0.
    """
    counts: dict[tuple[str, str], list[int]] = {}
    replies = all_met = 0
    for constraints, reply in items:
        met = check_constraints(constraints, reply)
        replies += 1
        all_met += all(met)
        for c, ok in zip(constraints, met):
            for key in (("kind", c["kind"]), ("decided_by", KINDS[c["kind"]].decided_by), ("all", "all")):
                counts.setdefault(key, [0, 0])[0] += ok
                counts[key][1] += 1

    def rate(key):
        ok, n = counts.get(key, (0, 0))
        return {"n": n, "pass_rate": ok / n if n else None}

    return {"replies": replies, "all_met": all_met / replies if replies else None,
            "constraints": rate(("all", "all"))["n"], "pass_rate": rate(("all", "all"))["pass_rate"],
            "by_kind": {k: rate(("kind", k)) for k in KINDS if ("kind", k) in counts},
            "by_decided_by": {t: rate(("decided_by", t)) for t in DECIDED_BY}}

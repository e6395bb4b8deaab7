"""A seeded synthetic preference task for the offline demo, built to show what POET is about.

What makes a reply preferred is decided in its first sentence: the chosen reply opens helpfully and names the
prompt's topic ("Sure, here is a note on the river."), the rejected one opens with a refusal ("No. I will not
do that."). After the opener both replies continue with filler sentences drawn independently from the same
small word bank, so the tail carries no information about what was asked. Two variants (`TASKS`):

- "balanced": 1-6 filler sentences on each side, so either reply may be the longer one.
- "length-bias" (the demo's): the chosen reply adds 0-1 filler sentences, the rejected one 6-9. Rejected
  replies are systematically long, as verbose bad answers are in real data. Full-length DPO can then win its
  margin in the tail: lowering the likelihood of the many filler tokens that follow a refusal raises the
  summed margin fast, the loss saturates, and the opener -- the only thing generation and the judge care
  about -- moves less. POET scores both replies on their first min(len) tokens, which for these pairs is
  the chosen reply's length, so the long tail cannot carry the margin. This is the reward-generation gap the
  POET paper describes; the "balanced" variant is the control where the shortcut is weaker.

The vocabulary is small (tens of words) so a small model learns the replies in a few hundred steps.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Optional

TOPICS = ("river", "moon", "forest", "city", "ocean", "garden", "desert", "mountain")
PROMPTS = (
    "Tell me about the {t}.",
    "Describe the {t}.",
    "What is the {t} like?",
    "Can you talk about the {t}?",
)
HELPFUL_OPENERS = (
    "Sure, here is a note on the {t}.",
    "Of course! The {t} is worth a look.",
    "Happy to help with the {t}.",
)
"""A chosen reply starts with one of these, with `{t}` the prompt's topic."""
UNHELPFUL_OPENERS = (
    "No. I will not do that.",
    "I refuse to answer that.",
    "Not my problem, ask someone else.",
)
"""A rejected reply starts with one of these. They name no topic."""

# Filler sentences: "<det> <adj> <noun> <verb> <adverb>." -- uninformative noise of random length.
_DETS = ("The", "That", "One", "Every")
_ADJS = ("old", "small", "quiet", "green", "bright", "cold")
_NOUNS = ("bird", "stone", "boat", "tree", "cloud", "road", "house", "wind")
_VERBS = ("moves", "rests", "sings", "waits", "shines", "turns")
_ADVS = ("slowly", "today", "again", "softly", "there", "alone")
MIN_FILLER, MAX_FILLER = 1, 6
TASKS = {
    "balanced": {"chosen": (MIN_FILLER, MAX_FILLER), "rejected": (MIN_FILLER, MAX_FILLER)},
    "length-bias": {"chosen": (0, 1), "rejected": (6, 9)},
}
"""Task variant -> (min, max) filler sentences after the opener, for each side."""


def _filler(rng: random.Random, lo: int = MIN_FILLER, hi: int = MAX_FILLER) -> str:
    n = rng.randint(lo, hi)
    return " ".join(
        f"{rng.choice(_DETS)} {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} {rng.choice(_ADVS)}."
        for _ in range(n)
    )


def make_pairs(n: int, seed: int, task: str = "balanced") -> list[dict]:
    """`n` preference rows in TRL's standard format: `{"prompt", "chosen", "rejected"}`, all strings.

    Deterministic in `seed` (Python's `random.Random`, independent of global state). Chosen and rejected
    share the prompt's topic only in the chosen opener; their filler tails are drawn independently, with the
    lengths of `task` (see `TASKS`: "balanced" lets either one be the longer). `judge` scores every chosen
    reply 1.0 and every rejected one 0.0.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    lengths = TASKS[task]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(PROMPTS).format(t=topic)
        chosen = _join(rng.choice(HELPFUL_OPENERS).format(t=topic), _filler(rng, *lengths["chosen"]))
        rejected = _join(rng.choice(UNHELPFUL_OPENERS), _filler(rng, *lengths["rejected"]))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _join(opener: str, filler: str) -> str:
    return f"{opener} {filler}" if filler else opener


def corpus_texts(seed: int = 0) -> list[str]:
    """Texts to train the tiny model's tokenizer on: every word, prompt and opener the task uses, plus the
    text that sits between chat tokens (newline-separated turns), so task text encodes into few tokens."""
    texts = [p.format(t=t) for p in PROMPTS for t in TOPICS]
    texts += [o.format(t=t) for o in HELPFUL_OPENERS for t in TOPICS]
    texts += list(UNHELPFUL_OPENERS)
    texts += [" ".join(words) for words in (_DETS, _ADJS, _NOUNS, _VERBS, _ADVS)]
    for row in make_pairs(200, seed):
        # The chat template renders "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{reply}<|end|>\n"; the
        # special tokens are cut out before training, so this is the text around them.
        texts.append(f"\n{row['prompt']}\n\n{row['chosen']}\n")
        texts.append(f"\n{row['prompt']}\n\n{row['rejected']}\n")
    return texts


def prompt_topic(prompt: str) -> Optional[str]:
    """The task topic named in `prompt`, or None when it names none (or several)."""
    found = [t for t in TOPICS if re.search(rf"\b{t}\b", prompt)]
    return found[0] if len(found) == 1 else None


def judge(prompt: str, reply: str) -> float:
    """Rule-based preference judge for generated replies (for win rates).

    1.0: the reply starts with a helpful opener naming the prompt's topic; 0.0: it starts with a refusal
    opener; 0.5: anything else (a helpful opener for another topic, or text that is neither). Only the start
    of the reply counts, after collapsing whitespace; what follows the opener is ignored.
    """
    text = " ".join(reply.split())
    if any(text.startswith(o) for o in UNHELPFUL_OPENERS):
        return 0.0
    topic = prompt_topic(prompt)
    if topic is not None and any(text.startswith(o.format(t=topic)) for o in HELPFUL_OPENERS):
        return 1.0
    return 0.5


def write_demo_dataset(folder, n_train: int = 512, n_valid: int = 64, seed: int = 0, task: str = "balanced") -> Path:
    """Write `train.jsonl` and `valid.jsonl` (one `make_pairs` row per line) into `folder`; return it.

    The two splits come from different seeds derived from `seed`, so they hold different draws."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", n_train, 2 * seed), ("valid", n_valid, 2 * seed + 1)):
        lines = [json.dumps(row) for row in make_pairs(n, s, task)]
        (out / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    return out


def opener_kind(reply: str) -> str:
    """What a reply opens with: "helpful" (a helpful opener, for any topic), "refusal", or "other"."""
    text = " ".join(reply.split())
    if any(text.startswith(o) for o in UNHELPFUL_OPENERS):
        return "refusal"
    if any(re.match(re.escape(o).replace(re.escape("{t}"), r"\w+"), text) for o in HELPFUL_OPENERS):
        return "helpful"
    return "other"

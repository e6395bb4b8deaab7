"""Constrained prompts for a small chat model: plain base tasks plus instructions from `constraints`.

A prompt is a short everyday task ("Describe a cat.") followed by one or more canonical instruction
sentences ("Answer in at most 20 words. Do not use any commas in your reply."); `constraints.judge` reads the
sentences back from the text. The tasks are easy on purpose: a 135M-parameter model can answer them, so
whether it passes depends on the instructions, not on knowledge.

The tasks are split once into "train" (4/5) and "heldout" by a hash of their text, within each task family
(so both splits hold every kind of task); held-out prompts use tasks never seen in training.
`build_prompts` is deterministic in its seed.
"""

from __future__ import annotations

import hashlib
import random
from typing import Optional, Sequence

from . import constraints as C

_DESCRIBE = ("a cat", "a dog", "a rainy day", "your favorite food", "a busy market", "a quiet library",
             "a sunrise", "an old bridge", "a winter morning", "a birthday party", "a small village",
             "a thunderstorm", "a city park", "a bicycle", "a good teacher", "a cup of tea", "a lighthouse",
             "a forest path", "a train station", "a snowy mountain", "a summer festival", "a kitchen",
             "an apple tree", "a school bus", "a fishing boat", "a hot desert", "a busy airport",
             "a warm blanket", "a toy robot", "a farmhouse")
_NOTE_ABOUT = ("the ocean", "the moon", "honey bees", "volcanoes", "the wind", "clouds", "rivers", "owls",
               "the stars", "autumn leaves", "penguins", "rainbows", "old castles", "the desert at night",
               "coral reefs", "butterflies", "the first day of spring", "maps", "bread", "kites", "whales",
               "snow", "candles", "bridges", "tigers", "the seasons", "libraries")
_ADVICE_ON = ("sleeping well", "saving money", "making friends", "learning a new language", "staying calm",
              "eating healthy", "keeping a plant alive", "studying for a test", "writing a letter",
              "cooking rice", "running a first race", "keeping a room tidy", "being on time", "drinking more water",
              "starting a garden", "caring for a puppy", "giving a short speech", "packing for a trip",
              "reading more books", "waking up early", "taking a good photo", "riding a bike safely",
              "planning a picnic", "asking for help", "sharing with others")
_EXPLAIN = ("why the sky is blue", "how rain forms", "why we need sleep", "how plants grow",
            "what a rainbow is", "why leaves change color", "how a magnet works", "what gravity does",
             "why the sea is salty", "how birds fly", "what the sun is", "why we brush our teeth",
             "how a seed becomes a tree", "what an echo is", "why ice floats", "how the heart works",
             "what a shadow is", "why the moon changes shape", "how bread rises", "what wind is",
             "how a clock keeps time", "why cats purr", "what a cloud is made of")
_TELL_ABOUT = ("your perfect weekend", "a favorite book", "a trip to the beach", "a funny pet",
               "a day at the zoo", "a happy memory", "learning to swim", "a walk in the rain", "a good meal",
               "a surprise gift", "a new hobby", "a kind neighbor", "a long journey by train",
               "a game you like", "a visit to a farm", "a song you enjoy", "a place you want to visit",
               "a lazy Sunday", "a snow day", "building a sandcastle", "a camping trip", "a school trip",
               "a picnic in the park", "the best day of the year")

TASK_FAMILIES: dict[str, tuple[str, ...]] = {
    "describe": tuple(f"Describe {x}." for x in _DESCRIBE),
    "note": tuple(f"Write a short note about {x}." for x in _NOTE_ABOUT),
    "advice": tuple(f"Give advice on {x}." for x in _ADVICE_ON),
    "explain": tuple(f"Explain to a child {x}." for x in _EXPLAIN),
    "tell": tuple(f"Tell me about {x}." for x in _TELL_ABOUT),
}
TASKS: tuple[str, ...] = tuple(t for family in TASK_FAMILIES.values() for t in family)
"""Every base task, distinct, each a plain one-sentence request."""

SPLITS = ("train", "heldout")
HELDOUT_SHARE = 0.2


def _digest(task: str) -> bytes:
    return hashlib.sha256(task.encode()).digest()


# Per family, the round(20%) tasks with the smallest SHA-256 are held out: every family is in both splits
# (a global hash rule put 10 of 23 "explain" tasks and 2 of 25 "advice" ones in held-out), the split is the
# same on every machine and Python, and adding a task moves at most one other, at its family's boundary.
_HELDOUT = frozenset(t for family in TASK_FAMILIES.values()
                     for t in sorted(family, key=_digest)[: round(HELDOUT_SHARE * len(family))])


def task_split(task: str) -> str:
    """ "train" or "heldout" for one of `TASKS`."""
    if task not in TASKS:
        raise ValueError(f"not a base task: {task!r}")
    return "heldout" if task in _HELDOUT else "train"


def tasks(split: str = "train") -> list[str]:
    """The base tasks of `split` ("train" or "heldout"), in `TASKS` order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [t for t in TASKS if task_split(t) == split]


def _pick_kinds(rng: random.Random, kinds: Sequence[str], k: int) -> list[str]:
    """Up to `k` distinct, pairwise compatible kinds, in random order (fewer when `kinds` has no more)."""
    pool = list(kinds)
    rng.shuffle(pool)
    chosen: list[str] = []
    for kind in pool:
        if len(chosen) == k:
            break
        if all(C.compatible(kind, other) for other in chosen):
            chosen.append(kind)
    return chosen


def build_prompts(n: int, seed: int, split: str = "train", kinds: Optional[Sequence[str]] = None,
                  per_prompt: tuple[int, int] = (1, 2)) -> list[dict]:
    """`n` constrained prompts over the tasks of `split`.

    Args:
        n: number of rows.
        seed: every draw comes from `random.Random` seeded from (`seed`, `split`), so the same arguments give
            the same rows, and the two splits draw independently.
        split: "train" or "heldout" (see `tasks`).
        kinds: constraint kind names to draw from (default: all of `constraints.KINDS`); see
            `constraints.kinds_decided_by` to draw by opening/end/whole.
        per_prompt: (min, max) constraints per prompt, drawn uniformly. Kinds that contradict each other
            (`constraints.compatible`) never share a prompt, so a prompt may get fewer than drawn when
            `kinds` is narrow (never fewer than one).

    Returns:
        Rows `{"prompt": text, "constraints": [constraint dicts, in prompt order], "task": base task}`. Tasks
        are dealt from a shuffled deck, so every task of the split is used before any repeats.
    """
    names = list(C.KINDS) if kinds is None else list(kinds)
    unknown = [k for k in names if k not in C.KINDS]
    if unknown or not names:
        raise ValueError(f"unknown constraint kinds {unknown or names}; known: {', '.join(C.KINDS)}")
    lo, hi = per_prompt
    if not 1 <= lo <= hi:
        raise ValueError(f"per_prompt must be (min, max) with 1 <= min <= max, got {per_prompt!r}")
    pool = tasks(split)
    rng = random.Random(f"constraint_tasks:{split}:{seed}")  # a str seed is hashed stably (SHA-512)
    rows, deck = [], []
    for _ in range(n):
        if not deck:
            deck = list(pool)
            rng.shuffle(deck)
        task = deck.pop()
        picked = _pick_kinds(rng, names, rng.randint(lo, hi))
        constraints = [C.draw(kind, rng) for kind in picked]
        rows.append({"prompt": C.render_prompt(task, constraints), "constraints": constraints, "task": task})
    return rows

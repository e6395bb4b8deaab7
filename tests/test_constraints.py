"""Instruction-following constraints: exact checkers, template round trips, the judge, the task split, prompts."""

from __future__ import annotations

import hashlib
import random

import pytest

from poet_mlx.analysis import constraint_tasks as T
from poet_mlx.analysis import constraints as C

# (constraint, replies that meet it, replies that do not). Every kind appears (checked below).
CASES = [
    ({"kind": "word_max", "n": 5},
     ["One two three four five.", "  don't stop me now ok  \n", "- a\n- b\n\n**c**"],
     ["One two three four five six.", "well-known facts are so fun"]),
    ({"kind": "word_min", "n": 4},
     ["One two three four.", "A well-known fact."],
     ["One two three.", "- - - * one, two!"]),
    ({"kind": "sentence_max", "n": 2},
     ["Hi there. How are you?", "Pi is 3.14 today. Yes.", "Wait... what?!", 'He said "hi." Then left.',
      "One sentence without an end"],
     ["A. B. C.", "- one\n- two\n- three", "Fine!\nGood.\nBye."]),
    ({"kind": "sentence_min", "n": 3},
     ["A. B. C.", "<<Title>>\nOne line.\nTwo lines", "Yes! No? Maybe.", 'She said "hi." He said (bye!) Gone'],
     ["Hi there. How are you?", "Is 2.5 big. No."]),
    ({"kind": "lowercase"},
     ["all lower, fine.", "cats: 3 of them!\n- yes\n"],
     ["all lower but I", "Cats.", "ends in Caps"]),
    ({"kind": "no_commas"},
     ["no commas here. none at all!", "a; b: c"],
     ["a, b", "one，two", "trailing,"]),
    ({"kind": "starts_with", "phrase": "In short"},
     ["In short, yes.", "in short it works", "  In   short\nit works", "IN SHORT."],
     ["In shortly we go.", "Well, in short", "**In short** yes", "In"]),
    ({"kind": "starts_with", "phrase": "Here is my answer:"},
     ["Here is my answer: cats.", "Here is my answer:\n- one"],
     ["Here is my answer cats.", "Here is an answer: cats."]),
    ({"kind": "first_word", "word": "Yes"},
     ["Yes, it is.", "yes it is", "**Yes** it is", "  Yes"],
     ["Yesterday was fine.", "Oh yes.", "Yes's fine"]),
    ({"kind": "title"},
     ["<<Cats>>\nCats are nice.", "  <<My Cat>> text", "<<a day at sea>>"],
     ["Cats <<Cats>>", "<< >>\nx", "<<>> x", "<Cats>\nx", "<<Cats\n>> x", "# Cats\nx"]),
    ({"kind": "ends_with", "phrase": "I hope this helps."},
     ["Done. I hope this helps.  \n", "i hope this helps.", "Tips:\n- rest\n\nI hope   this\nhelps."],
     ["I hope this helps", "I hope this helps.\n\nBye.", "**I hope this helps.**", "I hope this helps!"]),
    ({"kind": "ends_with", "phrase": "Enjoy!"},
     ["Have fun. Enjoy!"],
     ["Have fun. Reenjoy!", "Enjoy! Bye."]),
    ({"kind": "end_question"},
     ["What do you think?", 'Is it "fun?"', "**Ready?**\n", "Why?!", "(Really?)"],
     ["Why? Because.", "A question.", "What?\n\nNo.", "Why?.", "? no"]),
    ({"kind": "postscript"},
     ["Text.\n\nP.S. Call me.", "Text.\n\np.s. call me\n", "P.S. only a postscript."],
     ["Text. P.S. Call me.", "Text.\n\nP.S.", "P.S. first\n\nlast", "Text.\n\nPS call me"]),
    ({"kind": "keywords", "words": ["blue", "river"]},
     ["The Blue river.", "river, then blue-green", "RIVER BLUE"],
     ["blue rivers", "only blue", "bluer river"]),
    ({"kind": "keywords", "words": ["garden"]},
     ["A garden's gate? No: a garden."],
     ["gardens", "the gardener"]),
    ({"kind": "forbidden_word", "word": "very"},
     ["everything is nice", "Every day.", "verywell is one word"],
     ["It is Very good", "a very-good day", "VERY"]),
    ({"kind": "bullets", "n": 3},
     ["- a\n- b\n- c", "* a\n+ b\n  - c", "**Bold** intro\n- a\n- b\n- c\n", "---\n- a\n- b\n- c"],
     ["- a\n- b", "1. a\n2. b\n3. c", "-a\n-b\n-c", "- a - b - c", "- a\n- b\n- c\n- d"]),
    ({"kind": "paragraphs", "n": 2},
     ["A.\n\nB.", "A.\n \t\nB.\n\n\n", "A.\r\n\r\nB.", "A.\nstill A.\n\n\n\nB."],
     ["A.\nB.", "A.\n\nB.\n\nC.", "A."]),
    ({"kind": "json"},
     ['{"a": 1}', ' {"name": "cat", "legs": 4}\n', '```json\n{"a": 1}\n```', '```JSON\n{\n "a": [1, 2]\n}\n```\n',
      '```\n{"a": 1}\n```'],
     ["[1, 2]", 'Here: {"a": 1}', '{"a": 1', "{'a': 1}", '"just a string"', "{}", '```json\n{}\n```',
      '```json\n{"a": 1}\n``` Hope this helps.', 'Sure:\n```json\n{"a": 1}\n```', '```python\n{"a": 1}\n```',
      '```json {"a": 1}```', '```json\n{"a": 1}\n```\n```json\n{"b": 2}\n```']),
    ({"kind": "quoted"},
     ['"Cats are nice."', "“Cats are nice.”", '  "Cats"\n'],
     ['"Cats" are nice', 'Cats are "nice', "'Cats'"]),
]
NO_WORDS = ["", "   \n", "...", "- \n* ", '""', "{}"]


def test_cases_cover_every_kind():
    assert {c["kind"] for c, _, _ in CASES} == set(C.KINDS)


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[f"{c['kind']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_checker_on_handwritten_replies(constraint, good, bad):
    check = C.checker(constraint)
    for reply in good:
        assert check(reply), f"{constraint} should accept {reply!r}"
    for reply in bad:
        assert not check(reply), f"{constraint} should reject {reply!r}"
    for reply in NO_WORDS:  # an empty reply must not win a best-of-N pair by doing nothing
        assert not check(reply), f"{constraint} should reject the wordless {reply!r}"


def test_definitions():
    assert C.words("Don't stop, well-known 3.5 **bold** <<T>>") == ["don't", "stop", "well", "known", "3", "5",
                                                                  "bold", "t"]
    assert C.sentences("One. Two!? Three... 4.5 is four\n- five\n\n") == ["One", "Two", "Three", "4.5 is four",
                                                                          "- five"]
    assert C.bullets("- a\n  * b\n+ c\n1. d\n-e\n---") == 3
    assert C.paragraphs("\n\nA\nA2\n\n  \nB  \n") == ["A\nA2", "B"]


def test_decided_by_tags():
    tags = {name: kind.decided_by for name, kind in C.KINDS.items()}
    assert tags == {
        "word_max": "whole", "word_min": "whole", "sentence_max": "whole", "sentence_min": "whole",
        "lowercase": "whole", "no_commas": "whole", "starts_with": "opening", "first_word": "opening",
        "title": "opening", "ends_with": "end", "end_question": "end", "postscript": "end",
        "keywords": "whole", "forbidden_word": "whole", "bullets": "whole", "paragraphs": "whole",
        "json": "whole", "quoted": "whole",
    }
    assert C.kinds_decided_by("opening") == ["starts_with", "first_word", "title"]
    assert C.kinds_decided_by("end") == ["ends_with", "end_question", "postscript"]
    with pytest.raises(ValueError, match="decided_by"):
        C.kinds_decided_by("middle")


@pytest.mark.parametrize("kind", list(C.KINDS))
def test_render_parse_round_trip(kind):
    seen = set()
    for seed in range(200):
        c = C.draw(kind, random.Random(seed))
        assert C.parse_constraints(C.render(c)) == [c]
        task = T.TASKS[seed % len(T.TASKS)]
        assert C.parse_constraints(C.render_prompt(task, [c])) == [c]
        seen.add(C.render(c))
    assert (len(seen) > 1) == bool(C.KINDS[kind].fields)  # draws vary where the kind has parameters


def test_round_trip_of_built_prompts():
    for seed in range(200):
        for split in T.SPLITS:
            for row in T.build_prompts(3, seed, split, per_prompt=(1, 3)):
                assert C.parse_constraints(row["prompt"]) == row["constraints"]
                assert row["prompt"].startswith(row["task"] + " ")


def test_no_task_holds_an_instruction():
    for task in T.TASKS:
        assert C.parse_constraints(task) == []
        with pytest.raises(ValueError, match="no recognizable constraint"):
            C.judge(task, "A reply.")


def test_judge_scores_fraction_met():
    prompt = C.render_prompt("Describe a cat.", [{"kind": "no_commas"}, {"kind": "word_max", "n": 5}])
    assert prompt == "Describe a cat. Do not use any commas in your reply. Answer in at most 5 words."
    assert C.judge(prompt, "Cats are soft and warm.") == 1.0
    assert C.judge(prompt, "Cats, soft.") == 0.5
    assert C.judge(prompt, "Cats, dogs, and birds are all lovely animals.") == 0.0
    assert C.judge(prompt, "") == 0.0


def test_judge_error_names_the_prompt():
    with pytest.raises(ValueError, match="Tell me a joke"):
        C.judge("Tell me a joke.", "No.")


def test_check_constraints_and_bad_constraints():
    cs = [{"kind": "lowercase"}, {"kind": "first_word", "word": "Yes"}, {"kind": "end_question"}]
    assert C.check_constraints(cs, "yes, is it?") == [True, True, True]
    assert C.check_constraints(cs, "Yes. It is.") == [False, True, False]
    for bad in ({"kind": "nope"}, {"n": 3}, "word_max"):
        with pytest.raises(ValueError, match="not a constraint"):
            C.checker(bad)


def test_breakdown():
    items = [
        ([{"kind": "no_commas"}, {"kind": "ends_with", "phrase": "The end."}], "No commas. The end."),
        ([{"kind": "no_commas"}, {"kind": "starts_with", "phrase": "Okay."}], "Okay. One, two."),
        ([{"kind": "ends_with", "phrase": "The end."}], "Not the end"),
    ]
    b = C.breakdown(items)
    assert b["replies"] == 3 and b["constraints"] == 5
    assert b["all_met"] == pytest.approx(1 / 3)
    assert b["pass_rate"] == pytest.approx(3 / 5)
    assert b["by_kind"] == {"no_commas": {"n": 2, "pass_rate": 0.5}, "ends_with": {"n": 2, "pass_rate": 0.5},
                            "starts_with": {"n": 1, "pass_rate": 1.0}}
    assert b["by_decided_by"] == {"opening": {"n": 1, "pass_rate": 1.0}, "end": {"n": 2, "pass_rate": 0.5},
                                  "whole": {"n": 2, "pass_rate": 0.5}}
    empty = C.breakdown([])
    assert empty["all_met"] is None and empty["by_decided_by"]["end"] == {"n": 0, "pass_rate": None}


def test_banks_never_contradict_other_constraints():
    phrases = C.START_PHRASES + C.END_PHRASES
    assert not any("," in p for p in phrases)  # "no commas" may share the prompt
    other_words = {w for p in phrases + C.FIRST_WORDS + C.KEYWORDS + ("P.S.",) for w in C.words(p)}
    assert not other_words & set(C.FORBIDDEN_WORDS)
    # Phrases compare case-blind, so "lowercase" can share a prompt with a capitalized phrase.
    prompt = C.render_prompt("Describe a cat.", [{"kind": "lowercase"}, {"kind": "starts_with", "phrase": "Okay."}])
    assert C.judge(prompt, "okay. cats purr.") == 1.0


def test_task_split_is_disjoint_stratified_and_pinned():
    train, heldout = T.tasks("train"), T.tasks("heldout")
    assert len(T.TASKS) == len(set(T.TASKS)) >= 120
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(T.TASKS)
    for family in T.TASK_FAMILIES.values():
        held = [t for t in family if t in heldout]
        assert held and len(held) == round(0.2 * len(family))
    assert (len(train), len(heldout)) == (103, 26)
    # Pinned so a change of the held-out set is a deliberate act: results before and after must share it.
    assert hashlib.sha256("\n".join(heldout).encode()).hexdigest()[:12] == PINNED_HELDOUT
    with pytest.raises(ValueError, match="split"):
        T.tasks("test")
    with pytest.raises(ValueError, match="not a base task"):
        T.task_split("Describe a unicorn.")


PINNED_HELDOUT = "45952432c664"


def test_build_prompts_is_deterministic_and_well_formed():
    a = T.build_prompts(60, seed=3)
    assert a == T.build_prompts(60, seed=3)
    assert a != T.build_prompts(60, seed=4)
    assert [r["task"] for r in T.build_prompts(60, 3, "heldout")] != [r["task"] for r in a]
    train = set(T.tasks("train"))
    for row in a:
        assert set(row) == {"prompt", "constraints", "task"} and row["task"] in train
        assert 1 <= len(row["constraints"]) <= 2
        kinds = [c["kind"] for c in row["constraints"]]
        assert all(C.compatible(x, y) for i, x in enumerate(kinds) for y in kinds[i + 1 :])
    # Tasks are dealt from a deck: no repeat before every task was used once.
    held = T.build_prompts(len(T.tasks("heldout")), seed=0, split="heldout")
    assert sorted(r["task"] for r in held) == sorted(T.tasks("heldout"))
    assert len({c["kind"] for r in T.build_prompts(300, 0) for c in r["constraints"]}) == len(C.KINDS)


def test_build_prompts_options():
    opening = C.kinds_decided_by("opening")
    rows = T.build_prompts(50, 1, kinds=opening, per_prompt=(2, 2))
    assert all(len(r["constraints"]) == 1 and r["constraints"][0]["kind"] in opening for r in rows)  # one opening each
    rows = T.build_prompts(50, 1, per_prompt=(3, 3))
    assert all(len(r["constraints"]) == 3 for r in rows)
    with pytest.raises(ValueError, match="unknown constraint kinds"):
        T.build_prompts(1, 0, kinds=["word_max", "shout"])
    with pytest.raises(ValueError, match="per_prompt"):
        T.build_prompts(1, 0, per_prompt=(0, 2))
    with pytest.raises(ValueError, match="split"):
        T.build_prompts(1, 0, split="valid")

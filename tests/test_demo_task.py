"""The synthetic demo task: deterministic, decided early, lengths differing both ways, judged by rule."""

from __future__ import annotations

import json
import re

from poet_mlx.demo import task as demo_task


def test_pairs_are_deterministic_and_well_formed():
    a = demo_task.make_pairs(50, seed=7)
    assert a == demo_task.make_pairs(50, seed=7)
    assert a != demo_task.make_pairs(50, seed=8)
    assert len(a) == 50
    for row in a:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v for v in row.values())
        assert row["chosen"] != row["rejected"]
    assert len({row["prompt"] for row in a}) > 5


def test_lengths_differ_both_ways():
    rows = demo_task.make_pairs(400, seed=0)
    diffs = [len(r["chosen"].split()) - len(r["rejected"].split()) for r in rows]
    assert sum(d > 0 for d in diffs) > 0.3 * len(rows)
    assert sum(d < 0 for d in diffs) > 0.3 * len(rows)


def test_judge_scores_generated_pairs():
    for row in demo_task.make_pairs(200, seed=1):
        assert demo_task.judge(row["prompt"], row["chosen"]) == 1.0
        assert demo_task.judge(row["prompt"], row["rejected"]) == 0.0


def test_judge_looks_only_at_the_opening_and_the_topic():
    prompt = "Tell me about the river."
    assert demo_task.judge(prompt, "  Sure, here is a note on the\nriver. No. I will not do that.") == 1.0
    assert demo_task.judge(prompt, "Sure, here is a note on the moon.") == 0.5  # wrong topic
    assert demo_task.judge(prompt, "The old bird sings softly.") == 0.5
    assert demo_task.judge(prompt, "") == 0.5
    assert demo_task.judge(prompt, "No. I will not do that. Sure, here is a note on the river.") == 0.0
    assert demo_task.judge("Hello there.", "Sure, here is a note on the river.") == 0.5  # prompt names no topic


def test_signal_is_in_the_first_word_and_tail_is_shared_noise():
    rows = demo_task.make_pairs(300, seed=2)
    first_chosen = {r["chosen"].split()[0] for r in rows}
    first_rejected = {r["rejected"].split()[0] for r in rows}
    assert not first_chosen & first_rejected

    def tail(reply):  # everything after the opener sentence(s)
        for opener in demo_task.HELPFUL_OPENERS + demo_task.UNHELPFUL_OPENERS:
            for topic in demo_task.TOPICS:
                o = opener.format(t=topic)
                if reply.startswith(o):
                    return reply[len(o):].split()
        raise AssertionError(reply)

    chosen_words = {w for r in rows for w in tail(r["chosen"])}
    rejected_words = {w for r in rows for w in tail(r["rejected"])}
    assert chosen_words == rejected_words  # the same word bank: no preference signal in the tail


def test_corpus_covers_every_word():
    corpus = " ".join(demo_task.corpus_texts(0))
    assert corpus == " ".join(demo_task.corpus_texts(0))
    vocab = set(re.findall(r"\w+", corpus))
    for row in demo_task.make_pairs(200, seed=99):
        for text in row.values():
            assert set(re.findall(r"\w+", text)) <= vocab


def test_demo_text_tokenizes_compactly(tiny_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    row = demo_task.make_pairs(1, seed=4)[0]
    # Every word of the task (with its leading space) is a single token.
    for word in row["chosen"].replace(".", "").replace(",", "").replace("!", "").split()[1:]:
        assert len(tok.encode(" " + word).ids) == 1, word


def test_write_demo_dataset(tmp_path):
    out = demo_task.write_demo_dataset(tmp_path / "demo", n_train=20, n_valid=5, seed=3)
    assert out == tmp_path / "demo"
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(line) for line in (out / "valid.jsonl").read_text().splitlines()]
    assert len(train) == 20 and len(valid) == 5
    assert train != valid[:5] and train[:5] != valid
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in train + valid)
    again = demo_task.write_demo_dataset(tmp_path / "again", n_train=20, n_valid=5, seed=3)
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()

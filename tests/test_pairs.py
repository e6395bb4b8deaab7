"""`poet-mlx pairs`: on-policy pairs from sampled, judged replies; TRL's format; resumable; counted skips."""

from __future__ import annotations

import json

import pytest
from conftest import cli, one_error_line

from poet_mlx.errors import PoetError
from poet_mlx.generate.pairs import PairsOptions, build_pairs, choose, read_prompt_rows

JUDGES = '''
def length(prompt, reply):
    return float(len(reply.split()))

def constant(prompt, reply):
    return 1.0
'''


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Tell me about the {t}.", "task": t} for t in ("moon", "city", "river", "ocean", "forest")]
    rows.append({"prompt": [{"role": "user", "content": "Describe the garden."}], "task": "garden"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def judges(tmp_path):
    path = tmp_path / "judges.py"
    path.write_text(JUDGES)
    return path


def test_choose_by_hand():
    assert choose([0.2, 0.9, 0.5], [True, True, True], 0.0) == ((1, 0), "")
    assert choose([0.5, 0.5], [True, True], 0.0) == (None, "tie")
    assert choose([0.9, 0.2, 0.5], [False, True, True], 0.0) == ((2, 1), "")  # the best is cut: not chosen
    assert choose([0.9, 0.2], [False, False], 0.0) == (None, "unfinished")
    assert choose([0.6, 0.5], [True, True], 0.2) == (None, "margin")
    assert choose([1.0, 0.0, 1.0, 0.0], [True] * 4, 0.0) == ((0, 1), "")  # first best, first worst


def test_pairs_cli_writes_trl_conversational_pairs_that_train(tiny_sft_model_dir, prompts_file, judges, tmp_path, capsys):
    from poet_mlx.config import DataConfig
    from poet_mlx.data.sources import load_split

    out = tmp_path / "pairs.jsonl"
    rc = cli("pairs", "--model", tiny_sft_model_dir, "--prompts", prompts_file, "--judge", f"{judges}:length",
             "--out", out, "--samples", "3", "--max-tokens", "40", "--plain")
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and len(rows) <= 6
    for r in rows:
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        assert r["score_chosen"] > r["score_rejected"] and len(r["scores"]) == 3
        assert r["score_chosen"] == max(s for s, f in zip(r["scores"], r["finished"]) if f)
        assert r["settings"]["samples"] == 3 and r["settings"]["judge"].endswith(":length") and "task" in r
        assert float(len(r["chosen"][0]["content"].split())) == r["score_chosen"]
    loaded, report = load_split(DataConfig(data=str(out)), "train")
    assert len(loaded) == len(rows) and loaded[0].conversational
    assert "pairs from 6/6 prompts" in capsys.readouterr().out
    # Started again with the same settings: already complete, nothing redone.
    before = out.read_bytes()
    assert cli("pairs", "--model", tiny_sft_model_dir, "--prompts", prompts_file, "--judge", f"{judges}:length",
               "--out", out, "--samples", "3", "--max-tokens", "40", "--quiet") == 0
    assert out.read_bytes() == before
    # Other settings on the same file: one clear line.
    assert cli("pairs", "--model", tiny_sft_model_dir, "--prompts", prompts_file, "--judge", f"{judges}:length",
               "--out", out, "--samples", "4", "--max-tokens", "40") == 2
    assert "other settings (samples)" in one_error_line(capsys.readouterr().err)


def test_ties_are_counted_not_written(tiny_sft_model_dir, prompts_file, judges, tmp_path):
    from poet_mlx.analysis.judges import load_judge
    from poet_mlx.models import load_model

    model, tok, _ = load_model(str(tiny_sft_model_dir))
    summary = build_pairs(model, tok, read_prompt_rows(prompts_file), load_judge(f"{judges}:constant"),
                          PairsOptions(samples=2, max_tokens=6), tmp_path / "p.jsonl", {"s": 1})
    assert summary.pairs == 0 and summary.skipped["tie"] == 6 and summary.replies == 12
    assert (tmp_path / "p.jsonl").read_text() == ""


def test_an_interrupted_run_continues_to_the_same_file(tiny_sft_model_dir, prompts_file, judges, tmp_path, monkeypatch):
    from poet_mlx.analysis.judges import load_judge
    from poet_mlx.generate import pairs as pairs_mod
    from poet_mlx.models import load_model

    monkeypatch.setattr(pairs_mod, "CHUNK_REPLIES", 4)  # two prompts per chunk of 2 samples each
    model, tok, _ = load_model(str(tiny_sft_model_dir))
    rows, judge = read_prompt_rows(prompts_file), load_judge(f"{judges}:length")
    opts = PairsOptions(samples=2, max_tokens=40, seed=3)
    whole = build_pairs(model, tok, rows, judge, opts, tmp_path / "whole.jsonl", {"s": 1},
                        samples_out=tmp_path / "whole.samples.jsonl")
    calls = {"n": 0}

    def stop_after_one_chunk():
        calls["n"] += 1
        return calls["n"] > 1

    part = build_pairs(model, tok, rows, judge, opts, tmp_path / "part.jsonl", {"s": 1}, should_stop=stop_after_one_chunk,
                       samples_out=tmp_path / "part.samples.jsonl")
    assert whole.pairs > 0 and part.interrupted and part.done == 2
    # A kill between the append and the progress record leaves a stray tail: it is dropped on resume.
    with open(tmp_path / "part.jsonl", "a") as f:
        f.write('{"half a row')
    with open(tmp_path / "part.samples.jsonl", "a") as f:
        f.write('{"half')
    rest = build_pairs(model, tok, rows, judge, opts, tmp_path / "part.jsonl", {"s": 1},
                       samples_out=tmp_path / "part.samples.jsonl")
    assert not rest.interrupted and rest.done == 6 and rest.pairs == whole.pairs
    assert (tmp_path / "part.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    # Every judged reply, pair or not: 6 prompts x 2 samples, with the prompt row's fields.
    samples = [json.loads(line) for line in (tmp_path / "whole.samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["seed"]) for r in samples] == [(i, 3 + 2 * i + k) for i in range(6) for k in range(2)]
    assert all(r["score"] == float(len(r["reply"].split())) and "task" in r for r in samples)
    assert (tmp_path / "part.samples.jsonl").read_bytes() == (tmp_path / "whole.samples.jsonl").read_bytes()


def test_bad_prompt_files_and_options(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(PoetError, match="bad.jsonl:2"):
        read_prompt_rows(bad)
    with pytest.raises(PoetError, match="samples must be >= 2"):
        PairsOptions(samples=1).check()
    other = tmp_path / "other.jsonl"
    other.write_text("not ours\n")
    from poet_mlx.generate.pairs import PairsFile

    with pytest.raises(PoetError, match="not written by `poet-mlx pairs`"):
        PairsFile(other, {"s": 1})

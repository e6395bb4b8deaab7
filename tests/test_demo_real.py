"""The real-model demo's pipeline, wired end to end on the tiny SFT model (fast); the real SmolLM2 run is slow.

The tiny model does not follow instructions, but its replies vary in length and wording, so some constraints
(at most N words, no commas, a forbidden word) are met by some replies and not others: enough for pairs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from poet_mlx.demo.real import RealDemoSpec, run_real_demo, summarize

KINDS = ("word_max", "no_commas", "forbidden_word")


def small_spec(model_dir) -> RealDemoSpec:
    return replace(RealDemoSpec(), model=str(model_dir), kinds=KINDS, train_prompts=16, heldout_prompts=6, samples=3,
                   heldout_samples=2, max_tokens=40, epochs=1.0, batch_size=2, num_layers=2, rank=4,
                   learning_rate=1e-3, examples=2, losses=("dpo", "simpo"))


def test_real_demo_pipeline_end_to_end_and_reuse(tiny_sft_model_dir, tmp_path, capsys):
    from poet_mlx.cli.demo_real import comparison, print_results, reading

    folder = tmp_path / "demo"
    spec = small_spec(tiny_sft_model_dir)
    res = run_real_demo(folder, spec)
    assert not res["interrupted"]
    assert [r["label"] for r in res["runs"]] == ["DPO", "DPO+POET", "SimPO", "SimPO+POET"]
    assert [r["curve"]["loss"] for r in res["runs"] if "curve" in r] in ([], ["dpo", "dpo", "simpo", "simpo"])
    assert json.loads((folder / "demo_results.json").read_text())["runs"][1]["poet"] is True
    base = res["base"]
    assert base["all_met"]["n"] == 12 and 0 <= base["all_met"]["low"] <= base["all_met"]["rate"] <= base["all_met"]["high"]
    assert set(base["by"]) >= {"whole"} and res["train_pairs"]["pairs"] >= 2
    for r in res["runs"]:
        assert r["steps"] >= 1 and r["heldout"]["all_met"]["n"] == 12 and not r["reused"]
        assert "curve" in r or "prefix_note" in res
    # The held-out replies of the start and of each run share seeds: prompt i, sample k, same seed everywhere.
    seeds = [[json.loads(x)["seed"] for x in p.read_text().splitlines()]
             for p in (folder / "base" / "samples.jsonl", folder / "dpo" / "heldout" / "samples.jsonl")]
    assert seeds[0] == seeds[1]
    assert len(res["examples"]) == 2 and set(res["examples"][0]["replies"]) == {"base", "DPO", "DPO+POET", "SimPO",
                                                                                 "SimPO+POET"}
    # A second demo reuses every stage: same numbers, no training.
    again = run_real_demo(folder, spec)
    assert all(r["reused"] for r in again["runs"])
    assert [r["heldout"]["all_met"] for r in again["runs"]] == [r["heldout"]["all_met"] for r in res["runs"]]
    print_results(res, folder / "demo_results.json")
    out = capsys.readouterr().out
    for text in ("replies meeting all their instructions", "DPO+POET", "held-out prompt:", "Time:", "next:"):
        assert text in out, text
    said = " ".join(reading(res))
    assert "DPO+POET vs DPO" in said and "SimPO+POET vs SimPO" in said and comparison(res).row_count >= 6


def test_summarize_counts_by_what_decides_an_instruction(tmp_path):
    rows = [{"prompt_index": 0, "seed": 1, "reply": "Sure thing! Short.", "tokens": 4, "finished": True, "score": 1.0,
             "constraints": [{"kind": "starts_with", "phrase": "Sure thing!"}, {"kind": "word_max", "n": 10}]},
            {"prompt_index": 0, "seed": 2, "reply": "No, this one is long, with commas.", "tokens": 9,
             "finished": False, "score": 0.5,
             "constraints": [{"kind": "starts_with", "phrase": "Sure thing!"}, {"kind": "word_max", "n": 10}]}]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(path)
    assert s["all_met"]["rate"] == 0.5 and s["all_met"]["n"] == 2
    assert s["by"]["opening"]["rate"] == 0.5 and s["by"]["whole"]["rate"] == 1.0
    assert s["by"]["kind:word_max"]["n"] == 2 and s["mean_tokens"] == 6.5 and s["finished"] == 0.5


def test_cli_refuses_toy_flags_without_tiny(capsys):
    from conftest import cli, one_error_line

    assert cli("demo", "--task", "balanced") == 2
    assert "add --tiny" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_real_demo_on_smollm2(tmp_path):
    """The shipped demo on the real model (about 12 minutes on 2 cores; the model from the hub or PyPI)."""
    res = run_real_demo(tmp_path / "demo", RealDemoSpec())
    assert not res["interrupted"] and res["train_pairs"]["pairs"] >= 20
    for r in res["runs"]:
        assert r["heldout"]["all_met"]["n"] == 80 and r["loss_last"] < r["loss_first"]

"""The demo end to end: SFT start, DPO and DPO+POET, prefix curves, judged generations, files, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from poet_mlx.demo.toy import DemoSpec

SMALL = DemoSpec(hidden_size=64, num_layers=2, intermediate_size=128, train_pairs=32, valid_pairs=16, sft_steps=10,
                 steps=4, generate=4, max_tokens=8)
"""Sizes that run the whole demo in seconds: nothing is learned to speak of, every piece runs."""


def test_demo_task_variants():
    from poet_mlx.demo import task as demo_task

    rows = demo_task.make_pairs(200, seed=3, task="length-bias")
    chosen = [len(r["chosen"].split(".")) - 1 for r in rows]
    rejected = [len(r["rejected"].split(".")) - 1 for r in rows]
    # Sentences: the opener (1, or 2 for "No. I will not do that.") plus the filler.
    assert max(chosen) <= 2 and min(rejected) >= 7
    assert all(demo_task.judge(r["prompt"], r["chosen"]) == 1.0 for r in rows)
    assert all(demo_task.opener_kind(r["rejected"]) == "refusal" for r in rows)
    assert demo_task.make_pairs(20, seed=3) == demo_task.make_pairs(20, seed=3, task="balanced")
    with pytest.raises(ValueError, match="length-bias"):
        demo_task.make_pairs(1, 0, task="nope")
    assert demo_task.opener_kind("Of course! The moon is worth a look.") == "helpful"
    assert demo_task.opener_kind("Of course!") == "other"


def test_sft_learns_the_replies_and_saves_a_loadable_model(tiny_model_dir, tiny_data_dir, tmp_path):
    import mlx.core as mx

    from poet_mlx.config import RunConfig
    from poet_mlx.data.splits import load_pairs
    from poet_mlx.models import load_model
    from poet_mlx.objective import model_token_logps
    from poet_mlx.reporting import Reporter
    from poet_mlx.train.sft import save_model_folder, sft_batch, sft_examples, train_sft

    model, tok, _ = load_model(str(tiny_model_dir))
    cfg = RunConfig.from_flat({"model": str(tiny_model_dir), "data": str(tiny_data_dir)})
    pairs = load_pairs(cfg, tok, "train", Reporter()).pairs
    examples = sft_examples(pairs, "both")
    assert len(examples) == 2 * len(pairs) and examples[1][1] is pairs[0].rejected
    tokens, starts, lengths = sft_batch(examples, [0, 1], pad_id=0)
    assert tokens.shape[1] % 32 == 0 and starts.tolist() == [len(pairs[0].prompt) - 1] * 2
    losses = train_sft(model, examples, steps=20, batch_size=8, learning_rate=3e-3)
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.6 * losses[0]
    out = save_model_folder(model, tiny_model_dir, tmp_path / "sft")
    again, tok2, _ = load_model(str(out))
    x = mx.array(tokens)
    assert np.allclose(np.asarray(model_token_logps(again, x)), np.asarray(model_token_logps(model, x)), atol=1e-5)
    assert tok2.get_vocab() == tok.get_vocab()


def test_demo_runs_end_to_end_with_tiny_sizes(tmp_path):
    from poet_mlx.analysis.prefix import PrefixCurve
    from poet_mlx.demo.toy import RESULTS_FILE, SAMPLES_FILE, run_demo, sft_start

    folder = tmp_path / "demo"
    res = run_demo(folder, SMALL)
    assert not res["interrupted"] and [r["label"] for r in res["runs"]] == ["DPO", "DPO+POET"]
    assert json.loads((folder / RESULTS_FILE).read_text())["runs"][1]["label"] == "DPO+POET"
    assert res["sft"]["steps"] == 10 and res["sft"]["loss_end"] < res["sft"]["loss_start"]
    for r in res["runs"]:
        assert r["steps"] == 4 and set(r["eval"]) >= {"rewards/accuracies", "rewards/margins"}
        curve = PrefixCurve.from_json(json.loads((folder / r["path"].split("/")[-1] / "prefix_curve.json").read_text()))
        assert curve.label == r["label"] and curve.pairs[0] == 16 and curve.full["pairs"] == 16
        assert r["eval"]["rewards/accuracies"] == pytest.approx(curve.full["accuracy"])  # "full" = no POET cut
        g = r["generation"]
        assert g["helpful"] + g["refusal"] + g["other"] == pytest.approx(1.0) and g["win_rate"]["n"] == 4
        assert r["entropy_first"] > 0
    rows = [json.loads(line) for line in (folder / SAMPLES_FILE).read_text().splitlines()]
    assert [r["model"] for r in rows] == ["base"] * 4 + ["dpo"] * 4 + ["dpo-poet"] * 4
    # The SFT start is reused while the spec is the same, rebuilt when it changes.
    model_dir, data_dir = folder / "model", folder / "data"
    assert sft_start(folder, model_dir, data_dir, SMALL)[1]["reused"] is True
    assert sft_start(folder, model_dir, data_dir, replace(SMALL, sft_steps=3))[1]["reused"] is False


def test_demo_cli_prints_the_comparison(tmp_path, monkeypatch, capsys):
    import poet_mlx.demo.toy
    from poet_mlx.cli.main import main as cli

    monkeypatch.setattr(poet_mlx.demo.toy, "DemoSpec", lambda: SMALL)
    rc = cli(["demo", "--tiny", "--folder", str(tmp_path / "d"), "--plain", "--steps", "3", "--generate", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for text in ("SFT start", "DPO+POET", "accuracy, full replies", "win rate vs SFT start",
                 "implicit reward by prefix", "Time:", "prefix_curve.json"):
        assert text in out, text
    res = json.loads((tmp_path / "d" / "demo_results.json").read_text())
    assert [r["steps"] for r in res["runs"]] == [3, 3] and res["spec"]["generate"] == 2
    assert cli(["demo", "--tiny", "--folder", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_demo_cli_no_poet_trains_plain_dpo_only(tmp_path, monkeypatch, capsys):
    import poet_mlx.demo.toy
    from poet_mlx.cli.main import main as cli

    monkeypatch.setattr(poet_mlx.demo.toy, "DemoSpec", lambda: SMALL)
    rc = cli(["demo", "--tiny", "--folder", str(tmp_path / "d"), "--quiet", "--no-poet", "--generate", "0", "--steps", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "d" / "demo_results.json").read_text())
    assert [r["label"] for r in res["runs"]] == ["DPO"] and "generation" not in res["runs"][0]
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_default_demo_shows_the_gap(tmp_path):
    """The shipped demo, as `poet-mlx demo` runs it (about 1.5-2 minutes on 2 cores). Its design claim, in the
    two measurements that held in every seed tried: on the length-bias task DPO+POET prefers the chosen
    prefix at least as consistently as DPO at every k that all held-out pairs reach, and at the longer k's,
    which fewer pairs reach (20 of 64 at k = 16), it trails by at most one pair; its generations refuse no
    more often (fewer in every seed tried earlier, with one OpenBLAS thread; with two, whose rounding
    differs, both refused 9 of 32: a one-reply lead is within rounding, so only "no more" is asserted).
    The 100 training steps move with float rounding, which differs by CPU (the JIT builds kernels with
    -march=native): of five roundings tried on 2026-12-03 (the default; SwiGLU's backward alone, without the
    token-major attention output; POET_MLX_JIT=default; POET_MLX_BLAS_THREADS=1; POET_MLX_LAYERS=native),
    POET led or tied at every k up to 8 in all, and at k = 16 the native layers put it one pair of 20
    behind. The judged win rates differ by less than their intervals, so they are not asserted."""
    from poet_mlx.demo.toy import run_demo

    res = run_demo(tmp_path / "demo", DemoSpec())
    dpo, poet = res["runs"]
    assert dpo["eval"]["rewards/accuracies"] > 0.8 and poet["eval"]["rewards/accuracies"] > 0.8
    curve = dpo["curve"]
    every_pair = max(curve["pairs"])
    for a_dpo, a_poet, n in zip(curve["accuracy"], poet["curve"]["accuracy"], curve["pairs"]):
        if a_dpo is not None:
            assert a_poet >= a_dpo - (0.0 if n == every_pair else 1.0 / n + 1e-9)
    assert poet["generation"]["refusal"] <= dpo["generation"]["refusal"] < res["base"]["generation"]["refusal"]

def _result(prefix_dpo, prefix_poet, gen_dpo, gen_poet) -> dict:
    def run(label, acc, gen):
        refusal, other, rate = gen
        return {"label": label, "train_seconds": 1.0, "eval": {"rewards/accuracies": 1.0},
                "curve": {"k": [1, 2, 4], "accuracy": acc, "pairs": [64, 64, 0]},
                "generation": {"helpful": 1 - refusal - other, "refusal": refusal, "other": other,
                               "win_rate": {"rate": rate, "low": rate - 0.05, "high": rate + 0.05}}}

    return {"runs": [run("DPO", prefix_dpo, gen_dpo), run("DPO+POET", prefix_poet, gen_poet)],
            "base": {"generation": {"refusal": 0.5}}, "spec": {"task": "length-bias", "seed": 0},
            "sft": {"seconds": 1.0}, "seconds": 3.0, "eval_seconds": 1.0}


def test_the_demo_reading_follows_the_numbers():
    """The closing sentences are chosen from the measurements, never fixed text."""
    from poet_mlx.cli.demo_toy import reading

    gap = " ".join(reading(_result([1.0, 0.7, None], [1.0, 1.0, None], (0.3, 0.1, 0.6), (0.1, 0.1, 0.75))))
    assert "gap shows here" in gap and "DPO 0.70 at k=2" in gap and "intervals do not overlap" in gap
    stray = " ".join(reading(_result([1.0, 0.7, None], [1.0, 1.0, None], (0.3, 0.1, 0.6), (0.1, 0.5, 0.62))))
    assert "neither opener (50% vs 10%" in stray and "overlap, so this run alone" in stray
    none = " ".join(reading(_result([1.0, 1.0, None], [0.9, 1.0, None], (0.1, 0.1, 0.7), (0.3, 0.1, 0.6))))
    assert "did not show its point" in none and "-0.10" in none

"""Generation-level check: judges (loading and rejecting), win rates and their intervals, sampling with the
adapters off, the implicit judge, and `poet-mlx eval --generate/--prefix-curve/--entropy/--compare`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_config

from poet_mlx.analysis.generations import Sample, wilson_interval, win_rate
from poet_mlx.analysis.judges import CallableJudge, check_score, load_callable, load_judge
from poet_mlx.errors import PoetError


def sample(**kw) -> Sample:
    base = dict(index=3, prompt="Tell me about the river.", model="run", reply="Sure.", reply_ids=[1], finished=True,
                seed=0)
    return Sample(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ judges


def test_load_judge_by_module_and_by_file(tmp_path):
    from poet_mlx.demo import task as demo_task

    fn = load_callable("poet_mlx.demo.task:judge")
    assert fn is demo_task.judge
    judge = load_judge("poet_mlx.demo.task:judge")
    assert judge.score([sample(reply="No. I will not do that."), sample(reply="Sure, here is a note on the river.")]) \
        == [0.0, 1.0]
    (tmp_path / "judges.py").write_text("def length(prompt, reply):\n    return len(reply)\n")
    by_file = load_judge(f"{tmp_path / 'judges.py'}:length")
    assert by_file.score([sample(reply="abc")]) == [3.0]


@pytest.mark.parametrize("body, spec_tail, message", [
    (None, "no_such_module_xyz:judge", "no module named 'no_such_module_xyz'"),
    ("def judge(prompt, reply):\n    return 1.0\n", "missing_fn", "has no 'missing_fn'"),
    ("THRESHOLD = 0.5\n", "THRESHOLD", "not a function"),
    ("def judge(reply):\n    return 1.0\n", "judge", "cannot be called as judge(prompt, reply)"),
    ("def judge(prompt, reply, rubric):\n    return 1.0\n", "judge", "cannot be called as"),
    ("def judge(prompt, reply) -> str:\n    return 'good'\n", "judge", "annotated to return"),
    ("raise RuntimeError('boom')\n", "judge", "RuntimeError: boom"),
])
def test_bad_judges_are_rejected_with_a_clear_message(tmp_path, body, spec_tail, message):
    if body is None:
        spec = spec_tail
    else:
        path = tmp_path / "bad_judges.py"
        path.write_text(body)
        spec = f"{path}:{spec_tail}"
    with pytest.raises(PoetError, match="--judge") as err:
        load_judge(spec)
    assert message in str(err.value)


def test_malformed_specs():
    for spec in ("poet_mlx.demo.task", ":judge", "poet_mlx.demo.task:"):
        with pytest.raises(PoetError, match="module:function"):
            load_judge(spec)
    with pytest.raises(PoetError, match="needs a run folder"):
        load_judge("implicit:")
    with pytest.raises(PoetError, match="not a poet-mlx run folder"):
        load_judge("implicit:/nonexistent/run")
    with pytest.raises(PoetError, match="not found"):
        load_judge("/nonexistent/judges.py:judge")


def test_bad_return_values_are_caught_when_scoring():
    for value in ("good", None, float("nan"), [1.0]):
        judge = CallableJudge(lambda p, r, v=value: v, "mine:judge")
        with pytest.raises(PoetError, match=r"judge mine:judge returned .* for prompt #3 \(run\)"):
            judge.score([sample()])
    assert check_score(np.float32(0.25), "j", sample()) == 0.25 and check_score(True, "j", sample()) == 1.0


# ------------------------------------------------------------------------------------------------- stats


def test_wilson_interval_matches_hand_computed_values():
    """z = 1.959964 (95%). 7/10: p = 0.7, denominator 1 + z^2/10 = 1.384146, centre (0.7 + 0.192073) / 1.384146
    = 0.644494, half-width z sqrt(0.021 + 0.009604) / 1.384146 = 0.247716 -> (0.3968, 0.8922), the textbook
    Wilson interval for 7 of 10. 6/10 -> (0.3127, 0.8318)."""
    low, high = wilson_interval(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)
    low, high = wilson_interval(6, 10)
    assert (round(low, 4), round(high, 4)) == (0.3127, 0.8318)
    low, high = wilson_interval(0, 5)  # lower 0; upper z^2 / (n + z^2) = 3.8415 / 8.8415 = 0.4345
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.4345, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_win_rate_counts_ties_as_half():
    aligned = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0]
    base = [0.0, 0.5, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    w = win_rate(aligned, base)
    # wins: idx 0, 4, 5, 6, 8, 9 -> 6; ties: 1, 3, 7 -> 3; losses: 2 -> 1. Rate (6 + 1.5) / 10.
    assert (w.wins, w.ties, w.losses, w.n) == (6, 3, 1, 10)
    assert w.rate == pytest.approx(0.75)
    assert (w.low, w.high) == pytest.approx(wilson_interval(7.5, 10))
    assert w.low < w.rate < w.high
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 0.0])


# ------------------------------------------------------------------------------------------ model-backed


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    from poet_mlx.train.run import run_training

    run = tmp_path_factory.mktemp("gen") / "run"
    run_training(run_config(tiny_model_dir, tiny_data_dir, run, iters=6, learning_rate=5e-3))
    return run


def test_adapters_off_equals_the_base_model_logits_and_samples(tiny_model_dir, trained_run):
    import mlx.core as mx

    from poet_mlx.adapters import adapters_disabled, load_adapters
    from poet_mlx.generate.sampling import sample_replies
    from poet_mlx.models import load_model

    base, tok, _ = load_model(str(tiny_model_dir))
    tuned, _, _ = load_model(str(tiny_model_dir))
    load_adapters(tuned, trained_run)
    prompts = [np.asarray(tok.apply_chat_template([{"role": "user", "content": f"Describe the {t}."}],
                                                  add_generation_prompt=True), np.int32) for t in ("moon", "city")]
    x = mx.array(prompts[0])[None]
    with adapters_disabled(tuned):
        assert np.array_equal(np.asarray(tuned(x)), np.asarray(base(x)))
        off = sample_replies(tuned, tok, prompts, 12, 1.0, seed=5)
    assert not np.array_equal(np.asarray(tuned(x)), np.asarray(base(x)))  # the adapters are back
    assert off == sample_replies(base, tok, prompts, 12, 1.0, seed=5)
    # Seeds are per prompt: prompt 1 alone with seed 6 gives the same reply as in the batch with seed 5.
    assert sample_replies(base, tok, prompts[1:], 12, 1.0, seed=6)[0] == off[1]
    for text, ids, finished in off:
        assert text == tok.decode(ids) and (finished or len(ids) == 12)


def _draw_margin(model, prompt, seed: int, prefix: list) -> float:
    """The gap between the two largest Gumbel-perturbed log-probs of the draw that follows `prompt + prefix`
    for the reply seeded `seed` (`SeededSampler` at temperature 1: the draw's key is the key's
    len(prefix) + 1-th split), from a single-row forward without a cache."""
    import mlx.core as mx

    logits = model(mx.array([list(prompt) + list(prefix)]))[:, -1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    key = mx.random.key(seed)
    for _ in range(len(prefix) + 1):
        key, draw = mx.random.split(key)
    top = np.sort(np.array(logprobs + mx.random.gumbel(logprobs.shape, key=draw))[0])
    return float(top[-1] - top[-2])


def _assert_same_but_rounding_ties(model, prompts, seeds, got, want, tol: float = 1e-3) -> None:
    """Equal replies, or replies that part at a draw whose two best perturbed log-probs tie to within `tol`:
    logits of a batch differ from a single row's by float rounding (GEMMs of other shapes), which can flip
    an exact tie and nothing else. A real batching error (padding, masks, rows mixed up) changes most replies
    and parts them at draws that are not ties."""
    parted = 0
    for prompt, seed, a, b in zip(prompts, seeds, got, want):
        if a == b:
            continue
        parted += 1
        at = next((i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), min(len(a.ids), len(b.ids)))
        margin = _draw_margin(model, prompt, seed, b.ids[:at])
        assert margin < tol, f"replies part at token {at} of a draw won by {margin:.3g}: not a rounding tie"
    assert parted <= 2, f"{parted} of {len(got)} replies depend on the batch"


def test_batched_sampling_is_independent_of_the_batch_and_greedy_matches_mlx_lm(tiny_model_dir, trained_run,
                                                                                monkeypatch):
    """A reply depends on its prompt, seed and model only: batch size 1, 3 or 8 and a shuffled order give the
    same replies, but for draws that tie to float rounding; greedy batched decoding gives mlx-lm's
    single-stream greedy tokens."""
    from mlx_lm import stream_generate

    from poet_mlx.adapters import load_adapters
    from poet_mlx.generate import sampling
    from poet_mlx.generate.sampling import sample
    from poet_mlx.models import load_model

    model, tok, _ = load_model(str(tiny_model_dir))
    load_adapters(model, trained_run)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{q} the {t}."}], add_generation_prompt=True)
               for q in ("Describe", "Tell me about") for t in ("moon", "city", "river", "ocean")]
    seeds = list(range(100, 100 + len(prompts)))
    one = sample(model, tok, prompts, seeds, 16, 1.0, batch_size=1)
    _assert_same_but_rounding_ties(model, prompts, seeds, sample(model, tok, prompts, seeds, 16, 1.0, batch_size=3),
                                   one)
    order = [5, 2, 7, 0, 1, 6, 4, 3]
    shuffled = sample(model, tok, [prompts[i] for i in order], [seeds[i] for i in order], 16, 1.0, batch_size=8)
    _assert_same_but_rounding_ties(model, prompts, seeds, [shuffled[order.index(i)] for i in range(len(prompts))],
                                   one)
    monkeypatch.setattr(sampling, "PREFILL_ROWS", 3)  # prompts prefilled 3 at a time, joining a batch of 8
    _assert_same_but_rounding_ties(model, prompts, seeds, sample(model, tok, prompts, seeds, 16, 1.0, batch_size=8),
                                   one)
    # The margin check itself: another seed's reply parts from this one at a draw that is no tie.
    with pytest.raises(AssertionError, match="not a rounding tie"):
        _assert_same_but_rounding_ties(model, prompts[:1], seeds[:1], sample(model, tok, prompts[:1], [7], 16, 1.0),
                                       one[:1])
    assert len({tuple(r.ids) for r in one}) > 1  # sampled, not all alike
    greedy = sample(model, tok, prompts[:3], [0, 0, 0], 16, 0.0, batch_size=3)
    for prompt, reply in zip(prompts[:3], greedy):
        ids = [r.token for r in stream_generate(model, tok, prompt, max_tokens=16)]
        if reply.finished:
            ids = ids[:-1]  # mlx-lm yields the stop token; a Reply leaves it out
        assert reply.ids == ids


@pytest.mark.parametrize("fixture, dtype", [("tiny_model_dir", None), ("tiny_model_dir", "bfloat16"),
                                            ("tiny_quant_model_dir", None)])
def test_default_batch_follows_the_kv_cache_the_model_really_fills(fixture, dtype, request, monkeypatch):
    """kv_bytes_per_token equals the bytes mlx-lm's cache holds per token after a prefill (float32, bfloat16
    weights: a bfloat16 cache, 4-bit); batch_rows caps the rows by KV_BUDGET_BYTES."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from poet_mlx.generate import sampling
    from poet_mlx.models import load_model

    model, _, _ = load_model(str(request.getfixturevalue(fixture)))
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2, 3, 4, 5, 6, 7]]), cache=cache)
    held = sum(a.nbytes // a.shape[2] for c in cache for a in c.state[:2])  # keys, values: (1, KV, T, D)
    assert sampling.kv_bytes_per_token(model) == held
    assert sampling.batch_rows(model, [[1] * 10] * 200, 22) == sampling.BATCH_SIZE  # small: the full batch
    monkeypatch.setattr(sampling, "KV_BUDGET_BYTES", held * 32 * 5)
    assert sampling.batch_rows(model, [[1] * 10] * 200, 22) == 5  # 5 rows of 32 tokens fill the budget
    assert sampling.batch_rows(model, [[1] * 10, [1] * 300], 22) == 1  # never 0
    assert sampling.batch_rows(model, [[1] * 3] * 2, 1) == 2  # never more than the prompts


def test_seeded_sampler_draws_from_the_tempered_distribution():
    import mlx.core as mx

    from poet_mlx.generate.sampling import SeededSampler

    logits = mx.array([[2.0, 1.0, 0.0, -1.0]])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for temperature in (1.0, 0.5):
        sampler = SeededSampler(7, temperature)
        draws = np.array([sampler(logprobs).item() for _ in range(4000)])
        want = np.exp(np.array(logits[0]) / temperature)
        want /= want.sum()
        got = np.bincount(draws, minlength=4) / len(draws)
        np.testing.assert_allclose(got, want, atol=0.03)
    a, b, c = SeededSampler(7, 1.0), SeededSampler(7, 1.0), SeededSampler(8, 1.0)
    first = [a(logprobs).item() for _ in range(40)]
    assert first == [b(logprobs).item() for _ in range(40)]
    assert first != [c(logprobs).item() for _ in range(40)]


def test_gumbel_max_draw_never_draws_an_excluded_token():
    import mlx.core as mx

    from poet_mlx.generate.sampling import gumbel_max_draw

    logprobs = mx.array([[-np.inf, 0.0, -np.inf, 0.0, -np.inf], [-np.inf, -np.inf, 3.0, -np.inf, -np.inf]])
    draws = np.array([gumbel_max_draw(logprobs, mx.random.key(i), mx.array(1.0)).tolist() for i in range(200)])
    assert set(draws[:, 0]) == {1, 3} and set(draws[:, 1]) == {2}
    assert gumbel_max_draw(logprobs, mx.random.key(0), mx.array(1.0)).dtype == mx.uint32


def test_implicit_judge_is_the_runs_dpo_reward(tiny_model_dir, trained_run):
    import mlx.core as mx
    from mlx_lm.utils import load

    from poet_mlx.logprobs import per_token_logps

    model, tok = load(str(tiny_model_dir), adapter_path=str(trained_run))
    base, _ = load(str(tiny_model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe the moon."}], add_generation_prompt=True)
    reply = tok.encode("Sure, here is a note on the moon.", add_special_tokens=False)
    s = sample(reply_ids=reply, prompt_ids=np.asarray(prompt, np.int32), finished=True)
    judge = load_judge(f"implicit:{trained_run}")
    got = judge.score([s, sample(reply_ids=reply[:3], prompt_ids=np.asarray(prompt, np.int32), finished=False)], tok)
    seq = mx.array(prompt + reply + [tok.eos_token_id])[None]

    def logp(m):
        return float(per_token_logps(m(seq[:, :-1]), seq[:, 1:])[0, len(prompt) - 1:].sum())

    assert got[0] == pytest.approx(0.1 * (logp(model) - logp(base)), rel=1e-4, abs=1e-5)
    assert got[0] != pytest.approx(got[1])


def test_implicit_judge_of_a_ref_model_run_scores_against_that_model(tiny_model_dir, tiny_sft_model_dir,
                                                                      tiny_data_dir, tmp_path):
    """A run trained with --ref-model R is judged as it was trained: policy minus R, not minus its base."""
    import mlx.core as mx
    from mlx_lm.utils import load

    from poet_mlx.logprobs import per_token_logps
    from poet_mlx.train.run import run_training

    run = tmp_path / "refrun"
    run_training(run_config(tiny_model_dir, tiny_data_dir, run, iters=2, ref_model=str(tiny_sft_model_dir)))
    model, tok = load(str(tiny_model_dir), adapter_path=str(run))
    ref, _ = load(str(tiny_sft_model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe the moon."}], add_generation_prompt=True)
    reply = tok.encode("Sure, here is a note on the moon.", add_special_tokens=False)
    got = load_judge(f"implicit:{run}").score(
        [sample(reply_ids=reply, prompt_ids=np.asarray(prompt, np.int32), finished=True)], tok)
    seq = mx.array(prompt + reply + [tok.eos_token_id])[None]

    def logp(m):
        return float(per_token_logps(m(seq[:, :-1]), seq[:, 1:])[0, len(prompt) - 1:].sum())

    assert got[0] == pytest.approx(0.1 * (logp(model) - logp(ref)), rel=1e-4, abs=1e-5)


def test_eval_cli_prefix_curve_entropy_generation_and_compare(tiny_model_dir, tiny_data_dir, trained_run, tmp_path,
                                                              capsys):
    from poet_mlx.cli.main import main as cli
    from poet_mlx.train.run import run_training

    other = tmp_path / "other"
    run_training(run_config(tiny_model_dir, tiny_data_dir, other, iters=2, poet=True))
    samples, curves = tmp_path / "samples.jsonl", tmp_path / "curves.json"
    rc = cli(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(trained_run),
              "--compare", str(other), "--prefix-curve", "--entropy", "--generate", "3", "--judge",
              "poet_mlx.demo.task:judge", "--max-tokens", "6", "--samples", str(samples), "--curve-output", str(curves),
              "--quiet"])
    assert rc == 0, capsys.readouterr().err
    curve = json.loads((trained_run / "prefix_curve.json").read_text())
    assert curve["label"] == "run" and curve["k"][:3] == [1, 2, 4] and curve["pairs"][0] == 16
    assert curve["full"]["pairs"] == 16 and curve["data"] == str(tiny_data_dir)
    both = json.loads(curves.read_text())
    assert [c["label"] for c in both["curves"]] == ["run", "other"]
    assert [e["label"] for e in both["entropy"]] == ["base", "run", "other"]
    entropy = json.loads((other / "entropy.json").read_text())
    assert entropy["before"]["label"] == "base" and entropy["after"]["label"] == "other"
    assert entropy["after"]["chosen_count"][0] == 16 and entropy["after"]["chosen"][0] > 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["base"] * 3 + ["run"] * 3 + ["other"] * 3
    assert all(r["score"] in (0.0, 0.5, 1.0) and r["tokens"] <= 6 for r in rows)
    assert [r["seed"] for r in rows[:3]] == [0, 1, 2] and rows[0]["index"] == 0


def test_eval_cli_generation_mistakes_exit_2(tiny_model_dir, tiny_data_dir, trained_run, capsys):
    from poet_mlx.cli.main import main as cli

    common = ["eval", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir)]
    assert cli(common + ["--adapter-path", str(trained_run), "--generate", "2"]) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert cli(common + ["--adapter-path", str(trained_run), "--judge", "poet_mlx.demo.task:judge"]) == 2
    assert "add --generate" in capsys.readouterr().err
    assert cli(common + ["--generate", "2", "--judge", "poet_mlx.demo.task:judge"]) == 2
    assert "pass --adapter-path" in capsys.readouterr().err
    assert cli(common + ["--adapter-path", str(trained_run), "--generate", "2", "--judge", "nope_xyz:f"]) == 2
    assert "no module named 'nope_xyz'" in capsys.readouterr().err


def test_4bit_weights_expanded_once_for_sampling(tiny_quant_model_dir, monkeypatch):
    """Within `fast_quant.expanded` the 4-bit layers multiply by float32 copies made once: a batch's logits
    equal those of the expansion at every call bit for bit, no parameter is added, a budget keeps layers out,
    and the copies go on exit. `sample` runs inside it: no decoding step expands a weight again."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from poet_mlx.backends import fast_quant
    from poet_mlx.generate.sampling import sample
    from poet_mlx.models import load_model

    if not fast_quant.wanted():
        pytest.skip("the 4-bit fast path is Linux CPU only")
    model, tok, _ = load_model(str(tiny_quant_model_dir))
    layers = [m for _, m in model.named_modules() if getattr(m, "_poet_fast_quant", False)]
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    tokens = mx.array([[1, 5, 9, 13, 17, 21, 25], [2, 6, 10, 14, 18, 22, 26], [3, 7, 11, 15, 19, 23, 27]])
    ref = model(tokens)
    with fast_quant.expanded(model) as kept:
        assert kept == sum(4 * m["weight"].shape[0] * m["weight"].shape[1] * 8 for m in layers)
        assert mx.array_equal(model(tokens), ref).item()
        assert sorted(k for k, _ in tree_flatten(model.parameters())) == names
    assert not any(fast_quant._EXPANDED in m.__dict__ for m in layers)
    one = 4 * layers[0]["weight"].shape[0] * layers[0]["weight"].shape[1] * 8
    with fast_quant.expanded(model, budget_bytes=one) as kept:
        assert kept == one and [fast_quant._EXPANDED in m.__dict__ for m in layers].count(True) == 1

    calls = []
    real = fast_quant.dequantized_matmul
    monkeypatch.setattr(fast_quant, "dequantized_matmul", lambda g, b: calls.append(1) or real(g, b))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe the moon."}], add_generation_prompt=True)
    replies = sample(model, tok, [prompt] * 4, [1, 2, 3, 4], 8, 1.0)
    assert calls == [] and all(r.ids for r in replies)
    model(tokens)
    assert calls, "outside sampling the layers expand at every call again"

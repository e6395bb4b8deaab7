"""Acceptance check: `poet-mlx eval`'s per-pair numbers agree with an independent float64 reference.

The CLI runs in-process on the tiny model and writes its per-pair JSONL. The reference side shares nothing
with poet-mlx's batching, masking or losses: for every pair it runs the MLX model (`mlx_lm.load` of the folder,
with `adapter_path=` for a trained run) on ONE unpadded sequence, prompt + full response ids from
`tokenize_pairs`, takes the logits as float64 numpy, computes log-softmax token log-probs in numpy, applies the
POET cut and the loss with `reference_numpy`, and sums. The reference model of DPO is always the base model.

Agreement: rtol 1e-5 on every value, with a small absolute floor for values that are differences of nearly
equal sums (DPO rewards when policy == reference). DPO rewards and margins are compared relative to the
log-prob sums they are differences of (see `expected_rows`). Measured on CPU: worst relative difference
~3e-7 on log-probs, ref log-probs and SimPO values; ~1e-7 of the input scale on DPO rewards and losses.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_config

try:  # tests/ as a package or as a plain folder on sys.path
    from . import reference_numpy as ref
except ImportError:
    import reference_numpy as ref

MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 32
BETA = {"dpo": 0.1, "simpo": 2.0}
GAMMA_BETA_RATIO = 0.5
RTOL = 1e-5
ATOL = 1e-6
"""Absolute floor for near-zero values (rewards, margins and log-ratios when policy ~= reference)."""



# ------------------------------------------------------------------ the independent reference side


def response_token_logps(model, prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
    """float64 log-probs of each response token, from one unpadded forward over prompt + response."""
    seq = np.concatenate([prompt, response]).astype(np.int32)
    logits = model(mx.array(seq[None, :-1]))
    logits = np.asarray(logits.astype(mx.float32), dtype=np.float64)  # (1, T-1, V)
    per_token = ref.token_logps(logits, seq[None, 1:])[0]  # numpy log-softmax, float64
    out = per_token[len(prompt) - 1 :]
    assert len(out) == len(response)
    return out


def all_response_logps(model, pairs) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(response_token_logps(model, p.prompt, p.chosen), response_token_logps(model, p.prompt, p.rejected))
            for p in pairs]


def expected_rows(pairs, policy, reference, loss, poet, ratio=1.0, sft_weight=0.0) -> list[dict]:
    """Per-pair metrics from reference_numpy; `policy`/`reference` are per-token float64 log-probs.

    Each row also carries `scale/<metric>`: the magnitude the metric's error is relative to. A DPO reward
    beta * (pi - ref) is a difference of two sums of ~-200; float32 sums carry ~1e-7 relative error, so the
    reward is only good to ~1e-7 * beta * (|pi| + |ref|), which can be 1e-4 of the (small) reward itself.
    The tolerance is therefore RTOL times max(|value|, scale), i.e. 1e-5 relative to the inputs.
    """
    beta = BETA[loss]
    rows = []
    for i, p in enumerate(pairs):
        n_c, n_r = len(p.chosen), len(p.rejected)
        if poet:
            k = ref.poet_k(n_c, n_r, ratio)
            n_c = n_r = k
        pol_c, pol_r = policy[i]
        pc, pr = pol_c[:n_c].sum(), pol_r[:n_r].sum()
        row = {"num_tokens/chosen": n_c, "num_tokens/rejected": n_r}
        if loss == "dpo":
            rc, rr = reference[i][0][:n_c].sum(), reference[i][1][:n_r].sum()
            value, reward_c, reward_r = ref.dpo(pc, pr, rc, rr, beta)
            row.update({"ref_logps/chosen": rc, "ref_logps/rejected": rr})
            scale_c, scale_r = beta * (abs(pc) + abs(rc)), beta * (abs(pr) + abs(rr))
        else:
            value, reward_c, reward_r = ref.simpo(pc, pr, n_c, n_r, beta, GAMMA_BETA_RATIO)
            scale_c, scale_r = abs(float(reward_c)), abs(float(reward_r))
        # |d loss / d margin| <= 1 for the sigmoid losses, so the loss inherits the margin's error.
        scales = {"rewards/chosen": scale_c, "rewards/rejected": scale_r,
                  "rewards/margins": scale_c + scale_r, "loss": scale_c + scale_r}
        if loss == "simpo" and sft_weight:
            # The SFT term scores the FULL chosen responses, whatever POET cuts, as one token mean over the
            # batch (the official code's cross-entropy): here every pair is in one batch.
            nll = -sum(c.sum() for c, _ in policy) / sum(len(q.chosen) for q in pairs)
            row["nll_loss"] = nll
            value = value + sft_weight * nll
            scales["loss"] += sft_weight * abs(float(nll))
        # SimPO logs the average log-probs it scores (princeton SimPO, TRL's CPO); the DPO family the sums.
        logps = (pc / n_c, pr / n_r) if loss == "simpo" else (pc, pr)
        row.update({k: float(v) for k, v in ref.metrics(value, reward_c, reward_r, *logps).items()})
        row.update({f"scale/{k}": float(v) for k, v in scales.items()})
        rows.append(row)
    return rows


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def eval_file(tiny_data_dir):
    return tiny_data_dir / "valid.jsonl"


@pytest.fixture(scope="module")
def base_side(tiny_model_dir, eval_file):
    """(pairs, base model per-token log-probs), tokenized exactly as `poet-mlx eval` does."""
    from mlx_lm import load

    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import tokenize_pairs

    model, tokenizer = load(str(tiny_model_dir))
    cfg = run_config(tiny_model_dir, eval_file, "unused", max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    rows, _ = load_split(cfg.data, "train")  # a file is scored whole, as its "train" split
    pairs, _ = tokenize_pairs(rows, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH, chat_template=True)
    assert len(pairs) == 16
    assert any(len(p.chosen) != len(p.rejected) for p in pairs), "POET must have something to cut"
    return pairs, all_response_logps(model, pairs)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A run folder with LoRA adapters after 3 DPO+POET steps (so policy != reference)."""
    from poet_mlx.train.run import run_training

    run = tmp_path_factory.mktemp("parity_run") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module scope: keep the reference cache out of ~/.cache
        mp.setenv("POET_MLX_CACHE", str(tmp_path_factory.mktemp("parity_cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        summary = run_training(run_config(tiny_model_dir, tiny_data_dir, run, iters=3, poet=True, loss="dpo",
                                          max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH))
    assert summary["steps"] == 3
    return run


@pytest.fixture(scope="module")
def tuned_logps(tiny_model_dir, trained_run, base_side):
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir), adapter_path=str(trained_run))
    pairs, base = base_side
    tuned = all_response_logps(model, pairs)
    # The adapters really moved the policy away from the reference.
    assert max(abs(t[0].sum() - b[0].sum()) for t, b in zip(tuned, base)) > 1e-2
    return tuned


# ------------------------------------------------------------------ the CLI side


def cli_eval(tmp_path, model_dir, data_file, loss, poet, adapter=None, ratio=None, sft_weight=None,
             batch_size=4) -> list[dict]:
    from poet_mlx.cli.main import main

    out = tmp_path / "pairs.jsonl"
    argv = ["eval", "--model", str(model_dir), "--data", str(data_file), "--output", str(out), "--quiet",
            "--loss", loss, "--beta", str(BETA[loss]), "--batch-size", str(batch_size),
            "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH),
            "--poet" if poet else "--no-poet"]
    if loss == "simpo":
        argv += ["--gamma-beta-ratio", str(GAMMA_BETA_RATIO), "--sft-weight", str(sft_weight or 0.0)]
    if ratio is not None:
        argv += ["--poet-ratio", str(ratio)]
    if adapter is not None:
        argv += ["--adapter-path", str(adapter)]
    assert main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def assert_rows_match(got: list[dict], want: list[dict], label: str) -> None:
    assert [r["index"] for r in got] == list(range(len(want))), "one row per pair, in input order"
    metrics = [k for k in want[0] if not k.startswith("scale/")]
    assert set(metrics) <= set(got[0]), f"missing keys: {set(metrics) - set(got[0])}"

    def column(rows, key):
        return np.array([r.get(key, 0.0) for r in rows], dtype=np.float64)

    for key in metrics:
        if key == "rewards/accuracies":
            continue
        g, w = column(got, key), column(want, key)
        scale = np.maximum(np.abs(w), np.abs(column(want, f"scale/{key}")))
        assert np.all(np.isfinite(g)), f"{label}: {key} not finite"
        err = np.abs(g - w)
        ok = err <= RTOL * scale + ATOL
        bad = np.flatnonzero(~ok)
        assert ok.all(), (f"{label}: {key} differs at pairs {bad.tolist()}: got {g[bad].tolist()}, "
                          f"want {w[bad].tolist()} (max error / scale {(err / scale).max():.2e})")
    # Accuracies are (reward_c > reward_r): compare where the margin is clearly beyond its tolerance (with
    # policy == reference, DPO margins are rounding noise and the accuracy of either side is arbitrary).
    margin = column(want, "rewards/margins")
    decided = np.abs(margin) > 10 * (RTOL * column(want, "scale/rewards/margins") + ATOL)
    g_acc, w_acc = column(got, "rewards/accuracies"), column(want, "rewards/accuracies")
    assert set(np.unique(g_acc)) <= {0.0, 1.0}
    np.testing.assert_array_equal(g_acc[decided], w_acc[decided], err_msg=f"{label}: rewards/accuracies")


# ------------------------------------------------------------------ the checks


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
@pytest.mark.parametrize("poet", [False, True], ids=["full", "poet"])
def test_eval_matches_reference_base_model(loss, poet, tiny_model_dir, eval_file, base_side, tmp_path):
    pairs, base = base_side
    got = cli_eval(tmp_path, tiny_model_dir, eval_file, loss, poet)
    want = expected_rows(pairs, base, base, loss, poet)
    assert_rows_match(got, want, f"{loss} poet={poet} base")
    if poet:
        assert all(r["num_tokens/chosen"] == r["num_tokens/rejected"] for r in got)
        assert any(r["num_tokens/chosen"] < max(len(p.chosen), len(p.rejected)) for r, p in zip(got, pairs))


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
@pytest.mark.parametrize("poet", [False, True], ids=["full", "poet"])
def test_eval_matches_reference_with_trained_adapters(loss, poet, tiny_model_dir, eval_file, base_side,
                                                      trained_run, tuned_logps, tmp_path):
    """Policy = base + adapters from 3 training steps; DPO's reference stays the base model."""
    pairs, base = base_side
    got = cli_eval(tmp_path, tiny_model_dir, eval_file, loss, poet, adapter=trained_run)
    want = expected_rows(pairs, tuned_logps, base, loss, poet)
    assert_rows_match(got, want, f"{loss} poet={poet} adapters")
    if loss == "dpo":  # policy != reference shows in the rewards
        assert max(abs(r["rewards/chosen"]) for r in got) > 1e-3


def test_eval_poet_ratio_half(tiny_model_dir, eval_file, base_side, tuned_logps, trained_run, tmp_path):
    """The paper's ablation r = 0.5: both responses scored on floor(0.5 * k) tokens, policy and reference."""
    pairs, base = base_side
    got = cli_eval(tmp_path, tiny_model_dir, eval_file, "dpo", True, adapter=trained_run, ratio=0.5)
    want = expected_rows(pairs, tuned_logps, base, "dpo", True, ratio=0.5)
    assert_rows_match(got, want, "dpo poet ratio 0.5")
    assert [r["num_tokens/chosen"] for r in got] == [min(len(p.chosen), len(p.rejected)) // 2 for p in pairs]


def test_eval_simpo_sft_term_uses_full_chosen(tiny_model_dir, eval_file, base_side, tmp_path):
    """SimPO + POET + sft_weight: preference on the cut pair, SFT NLL on the whole chosen responses (a token
    mean over the batch: all 16 pairs in one batch here)."""
    pairs, base = base_side
    got = cli_eval(tmp_path, tiny_model_dir, eval_file, "simpo", True, sft_weight=0.5, batch_size=16)
    want = expected_rows(pairs, base, None, "simpo", True, sft_weight=0.5)
    assert "nll_loss" in got[0]
    assert_rows_match(got, want, "simpo poet sft")

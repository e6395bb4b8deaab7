"""Preference losses and metrics: hand-worked numbers, an independent float64 numpy reference, gradients.

Notation as in POET.md: pi_c, pi_r policy log-prob sums; ref_c, ref_r the reference's; n_c, n_r scored
token counts; h = (pi_c - ref_c) - (pi_r - ref_r); eps = label_smoothing; L(z) = log(1 + e^-z) = -log sigma(z).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poet_mlx.losses import (
    PairLogps,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    pair_metrics,
    preference_loss,
    robust_loss,
    sft_nll,
    simpo_loss,
)

try:  # tests/ as a package or as a plain folder on sys.path
    from . import reference_numpy as ref
except ImportError:
    import reference_numpy as ref

TRL_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def pair(pc, pr, nc=1, nr=1, rc=None, rr=None):
    """PairLogps from python/numpy values (float32, broadcast to a common (B,) shape)."""
    pc, pr, nc, nr = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, np.float32)) for v in (pc, pr, nc, nr)))
    f = lambda v: None if v is None else mx.array(np.broadcast_to(np.asarray(v, np.float32), pc.shape))
    return PairLogps(f(pc), f(pr), f(nc), f(nr), f(rc), f(rr))


def np64(x):
    return np.array(x, dtype=np.float64)


def close(actual, expected, rtol=1e-5, atol=1e-6, msg=""):
    np.testing.assert_allclose(np64(actual), np64(expected), rtol=rtol, atol=atol, err_msg=msg)


L02 = math.log1p(math.exp(-0.2))  # 0.5981388693815918


# ============================================================ (a) hand-computed cases


def test_dpo_hand_case():
    """beta = 0.1; pi_c = -10, ref_c = -12 (log-ratio +2); pi_r = ref_r = -15 (log-ratio 0): h = 2.
    loss = -log sigma(0.2) = log(1 + e^-0.2) = 0.598138869...; rewards: 0.1 * 2 = 0.2 and 0.1 * 0 = 0.
    """
    losses, rc, rr = dpo_sigmoid_loss(pair(-10.0, -15.0, rc=-12.0, rr=-15.0), beta=0.1)
    assert losses.shape == (1,) and losses.dtype == mx.float32
    close(losses, [0.5981388693815918], rtol=0, atol=1e-6)
    close(rc, [0.2], rtol=0, atol=1e-6)
    close(rr, [0.0], rtol=0, atol=1e-6)


def test_cdpo_hand_case():
    """Same pair, eps = 0.1: 0.9 L(0.2) + 0.1 L(-0.2), and L(-z) = z + L(z), so
    loss = 0.9 L + 0.1 (0.2 + L) = L + 0.02 = 0.618138869...
    """
    losses, _, _ = dpo_sigmoid_loss(pair(-10.0, -15.0, rc=-12.0, rr=-15.0), beta=0.1, label_smoothing=0.1)
    close(losses, [L02 + 0.02], rtol=0, atol=1e-6)
    assert abs(L02 + 0.02 - 0.6181388693815918) < 1e-15


def test_ipo_hand_case_uses_counts():
    """pi_c = -6, ref_c = -10, n_c = 4 -> averaged log-ratio +1; pi_r = -9, ref_r = -6, n_r = 3 -> -1.
    Difference 2. beta = 0.5: 1/(2 beta) = 1, loss = (2 - 1)^2 = 1; beta = 0.25: (2 - 2)^2 = 0;
    beta = 1: (2 - 0.5)^2 = 2.25. Rewards are beta * averaged log-ratios: 0.5 and -0.5 at beta 0.5.
    Unaveraged sums (4 and -3, difference 7) would give 36 at beta 0.5: the counts must matter.
    """
    p = pair(-6.0, -9.0, nc=4, nr=3, rc=-10.0, rr=-6.0)
    for beta, expected in [(0.5, 1.0), (0.25, 0.0), (1.0, 2.25)]:
        losses, rc, rr = ipo_loss(p, beta=beta)
        close(losses, [expected], rtol=0, atol=1e-6, msg=f"beta={beta}")
    losses, rc, rr = ipo_loss(p, beta=0.5)
    close(rc, [0.5], rtol=0, atol=1e-6)
    close(rr, [-0.5], rtol=0, atol=1e-6)


def test_hinge_hand_case():
    """beta = 0.5: relu(1 - 0.5 h). h = 2 -> exactly 0 (at the margin); h = 1 -> 0.5; h = -2 -> 2; h = 4 -> 0."""
    h = np.array([2.0, 1.0, -2.0, 4.0])
    # pi_c - ref_c = h, pi_r - ref_r = 0, with exactly representable values.
    losses, _, _ = hinge_loss(pair(h - 8.0, -5.0, rc=-8.0, rr=-5.0), beta=0.5)
    out = np.array(losses)
    assert out[0] == 0.0, f"hinge at the margin (beta h = 1) must be exactly 0, got {out[0]!r}"
    close(out, [0.0, 0.5, 2.0, 0.0], rtol=0, atol=1e-7)


def test_robust_hand_case():
    """beta = 0.1, h = 2, eps = 0.1: [0.9 L(0.2) - 0.1 L(-0.2)] / 0.8 = [0.9 L - 0.1 (0.2 + L)] / 0.8
    = (0.8 L - 0.02) / 0.8 = L - 0.025 = 0.573138869...
    """
    losses, rc, rr = robust_loss(pair(-10.0, -15.0, rc=-12.0, rr=-15.0), beta=0.1, label_smoothing=0.1)
    close(losses, [L02 - 0.025], rtol=0, atol=1e-6)
    assert abs(L02 - 0.025 - 0.5731388693815918) < 1e-15
    close(rc, [0.2], rtol=0, atol=1e-6)
    close(rr, [0.0], rtol=0, atol=1e-6)


def test_simpo_hand_case_with_sft():
    """beta = 2, gamma_beta_ratio = 0.5 -> gamma = 1. pi_c = -4 over 4 tokens (avg -1), pi_r = -9 over 3 (avg -3).
    m = 2 (-1 - (-3)) - 1 = 3; loss = log(1 + e^-3) = 0.048587351...; rewards 2 * -1 = -2 and 2 * -3 = -6.
    SFT term: full chosen response log-prob -12 over 6 tokens -> mean NLL 2; weight 0.5 adds 1.0.
    eps = 0.2: 0.8 L(3) + 0.2 (3 + L(3)) = L(3) + 0.6.
    """
    p = pair(-4.0, -9.0, nc=4, nr=3)
    losses, rc, rr = simpo_loss(p, beta=2.0, gamma_beta_ratio=0.5)
    close(losses, [0.04858735157374206], rtol=0, atol=1e-6)
    close(rc, [-2.0], rtol=0, atol=1e-6)
    close(rr, [-6.0], rtol=0, atol=1e-6)
    nll = sft_nll(mx.array([-12.0]), mx.array([6.0]))
    close(nll, [2.0], rtol=0, atol=1e-7)
    close(losses + 0.5 * nll, [0.04858735157374206 + 1.0], rtol=0, atol=1e-6)
    smoothed, _, _ = simpo_loss(p, beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.2)
    close(smoothed, [0.04858735157374206 + 0.6], rtol=0, atol=1e-6)


def test_simpo_ignores_reference():
    """SimPO has no reference model: reference values, if given, must not change anything."""
    a = simpo_loss(pair(-4.0, -9.0, nc=4, nr=3), beta=2.0, gamma_beta_ratio=0.5)
    b = simpo_loss(pair(-4.0, -9.0, nc=4, nr=3, rc=-100.0, rr=7.0), beta=2.0, gamma_beta_ratio=0.5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.array(x), np.array(y))


def test_large_margins_are_stable():
    """No overflow/NaN at |beta h| = 1000: loss ~ 0 for a huge positive margin, ~ 1000 for a huge negative one."""
    losses, _, _ = dpo_sigmoid_loss(pair([0.0, 0.0], [0.0, 0.0], rc=[-1000.0, 1000.0], rr=0.0), beta=1.0)
    out = np.array(losses)
    assert np.all(np.isfinite(out)), out
    close(out, [0.0, 1000.0], rtol=1e-6, atol=1e-6)


# ============================================================ (b) random property tests vs the numpy reference


def random_batch(seed, b=64):
    """Realistic sums: policy in [-300, -1], reference = policy + noise, counts 1..200 (all float32-exact)."""
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)
    pc = f32(rng.uniform(-300, -1, b))
    pr = f32(rng.uniform(-300, -1, b))
    rc = f32(pc + rng.normal(0, 4, b))
    rr = f32(pr + rng.normal(0, 4, b))
    nc = f32(rng.integers(1, 201, b))
    nr = f32(rng.integers(1, 201, b))
    return pc, pr, rc, rr, nc, nr


def reference_for(name, batch, beta, gamma_beta_ratio, eps):
    pc, pr, rc, rr, nc, nr = batch
    if name == "dpo":
        return ref.dpo(pc, pr, rc, rr, beta, eps)
    if name == "ipo":  # label smoothing does not apply (as in TRL)
        return ref.ipo(pc, pr, rc, rr, nc, nr, beta)
    if name == "hinge":  # label smoothing does not apply (as in TRL)
        return ref.hinge(pc, pr, rc, rr, beta)
    if name == "robust":
        return ref.robust(pc, pr, rc, rr, beta, eps)
    if name == "simpo":
        return ref.simpo(pc, pr, nc, nr, beta, gamma_beta_ratio, eps)
    raise AssertionError(name)


DIRECT = {"dpo": dpo_sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_loss, "simpo": simpo_loss}


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "robust", "simpo"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.4])
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0, 10.0])
def test_losses_match_numpy_reference(name, eps, beta):
    gbr = 0.3 if beta >= 2 else 0.5
    # A deterministic seed per case (str hashes are salted per process).
    batch = random_batch(seed=int(1000 * beta) + 7 * int(100 * eps) + 13 * len(name))
    pc, pr, rc, rr, nc, nr = batch
    p = pair(pc, pr, nc, nr, rc=rc, rr=rr)
    expected = reference_for(name, batch, beta, gbr, eps)
    via_dispatch = preference_loss(name, p, beta=beta, gamma_beta_ratio=gbr, label_smoothing=eps)
    direct = DIRECT[name](p, beta=beta, gamma_beta_ratio=gbr, label_smoothing=eps)
    for got in (via_dispatch, direct):
        for what, a, e in zip(("loss", "chosen reward", "rejected reward"), got, expected):
            assert a.shape == (len(pc),) and a.dtype == mx.float32
            close(a, e, rtol=1e-5, atol=1e-6, msg=f"{name} {what} beta={beta} eps={eps}")


finite = dict(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["dpo", "ipo", "hinge", "robust", "simpo"]),
    pc=st.floats(-500, 0, **finite),
    pr=st.floats(-500, 0, **finite),
    dc=st.floats(-20, 20, **finite),
    dr=st.floats(-20, 20, **finite),
    nc=st.integers(1, 4096),
    nr=st.integers(1, 4096),
    beta=st.sampled_from([0.01, 0.05, 0.1, 1.0, 2.5, 10.0]),
    gbr=st.floats(0, 1.5, **finite),
    eps=st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.45]),
)
def test_losses_match_reference_hypothesis(name, pc, pr, dc, dr, nc, nr, beta, gbr, eps):
    rc, rr = np.float32(pc + dc), np.float32(pr + dr)
    batch = tuple(np.array([v], np.float32) for v in (pc, pr, rc, rr, nc, nr))
    p = pair(*batch[:2], batch[4], batch[5], rc=batch[2], rr=batch[3])
    got = preference_loss(name, p, beta=beta, gamma_beta_ratio=gbr, label_smoothing=eps)
    expected = reference_for(name, batch, beta, gbr, eps)
    # The log-ratios are formed in float32 from sums up to 500: allow their rounding (~3e-5 absolute)
    # scaled by beta, on top of the relative tolerance.
    atol = 1e-6 + 1e-4 * beta
    for what, a, e in zip(("loss", "chosen reward", "rejected reward"), got, expected):
        close(a, e, rtol=1e-5, atol=atol if name != "ipo" else atol * (1 + abs(float(e[0]))), msg=f"{name} {what}")


def test_sft_nll_matches_reference():
    rng = np.random.default_rng(3)
    lp = rng.uniform(-500, -0.1, 32).astype(np.float32)
    n = rng.integers(1, 300, 32).astype(np.float32)
    close(sft_nll(mx.array(lp), mx.array(n)), ref.sft_term(lp, n, 1.0))
    assert np.all(np.array(sft_nll(mx.array(lp), mx.array(n))) > 0), "NLL of a log-prob < 0 must be positive"


# ============================================================ (c) metrics


def test_metric_names_and_values():
    """Rewards (0.2, 0.0), (0.1, 0.1) tie, (-0.3, 0.2): margins 0.2, 0.0, -0.5; accuracies 1, 0 (strict >), 0."""
    p = pair([-10.0, -11.0, -20.0], [-15.0, -14.0, -9.0], rc=[-12.0, -12.0, -17.0], rr=[-15.0, -15.0, -11.0])
    losses, rc, rr = dpo_sigmoid_loss(p, beta=0.1)
    m = pair_metrics(p, losses, rc, rr)
    assert set(m) == TRL_METRICS
    close(m["rewards/chosen"], [0.2, 0.1, -0.3])
    close(m["rewards/rejected"], [0.0, 0.1, 0.2])
    close(m["rewards/margins"], [0.2, 0.0, -0.5])
    np.testing.assert_array_equal(np.array(m["rewards/accuracies"]), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.array(m["logps/chosen"]), [-10.0, -11.0, -20.0])
    np.testing.assert_array_equal(np.array(m["logps/rejected"]), [-15.0, -14.0, -9.0])
    np.testing.assert_array_equal(np.array(m["loss"]), np.array(losses))
    for v in m.values():
        assert v.shape == (3,)


def test_exact_tie_is_not_accurate():
    """Identical rewards (bit-equal) count as wrong under the strict >."""
    p = pair(-5.0, -5.0, rc=-5.0, rr=-5.0)
    losses, rc, rr = dpo_sigmoid_loss(p, beta=0.1)
    m = pair_metrics(p, losses, rc, rr)
    assert float(m["rewards/accuracies"][0]) == 0.0
    close(losses, [math.log(2.0)], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "robust", "simpo"])
def test_metrics_match_reference(name):
    batch = random_batch(seed=11)
    pc, pr, rc, rr, nc, nr = batch
    p = pair(pc, pr, nc, nr, rc=rc, rr=rr)
    losses, rwc, rwr = preference_loss(name, p, beta=0.1, gamma_beta_ratio=0.5, label_smoothing=0.1)
    got = pair_metrics(p, losses, rwc, rwr)
    e_loss, e_c, e_r = reference_for(name, batch, 0.1, 0.5, 0.1)
    expected = ref.metrics(e_loss, e_c, e_r, pc, pr)
    assert set(got) == set(expected) == TRL_METRICS
    for key in TRL_METRICS:
        if key == "rewards/accuracies":
            # Compare with the code's own rewards, so float32 rounding cannot flip a near-tie.
            np.testing.assert_array_equal(np.array(got[key]), (np.array(rwc) > np.array(rwr)).astype(np.float32))
            assert np.mean(np.array(got[key]) == expected[key]) > 0.95
        else:
            close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)


# ============================================================ (d) special cases and gradients


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_zero_label_smoothing_cdpo_is_dpo(beta):
    pc, pr, rc, rr, nc, nr = random_batch(seed=5)
    p = pair(pc, pr, nc, nr, rc=rc, rr=rr)
    plain = dpo_sigmoid_loss(p, beta=beta)
    smoothed = dpo_sigmoid_loss(p, beta=beta, label_smoothing=0.0)
    robust = robust_loss(p, beta=beta, label_smoothing=0.0)
    for a, b, c in zip(plain, smoothed, robust):
        np.testing.assert_array_equal(np.array(a), np.array(b))
        close(c, a, rtol=1e-6, atol=1e-7, msg="robust with eps = 0 must equal DPO")


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_and_robust_are_different_losses(eps):
    """Guard against a sign slip: at eps > 0 cDPO and robust differ (robust = (cDPO - 2 eps L(-z)) / (1 - 2 eps))."""
    p = pair(-10.0, -15.0, rc=-12.0, rr=-15.0)
    c = float(dpo_sigmoid_loss(p, beta=0.1, label_smoothing=eps)[0][0])
    r = float(robust_loss(p, beta=0.1, label_smoothing=eps)[0][0])
    l_neg = L02 + 0.2  # L(-0.2)
    assert abs(r - (c - 2 * eps * l_neg) / (1 - 2 * eps)) < 1e-6


def _grads(loss_fn, p, argnums, **kw):
    def f(pc, pr):
        q = PairLogps(pc, pr, p.chosen_tokens, p.rejected_tokens, p.reference_chosen, p.reference_rejected)
        return loss_fn(q, **kw)[0].sum()

    return mx.grad(f, argnums=argnums)(p.policy_chosen, p.policy_rejected)


def test_dpo_gradient_signs_and_values():
    """d/d pi_c [-log sigma(beta h)] = -beta sigma(-beta h) < 0; d/d pi_r = +beta sigma(-beta h) > 0."""
    pc, pr, rc, rr, nc, nr = random_batch(seed=9, b=32)
    beta = 0.1
    p = pair(pc, pr, nc, nr, rc=rc, rr=rr)
    gc, gr = _grads(dpo_sigmoid_loss, p, (0, 1), beta=beta)
    gc, gr = np.array(gc), np.array(gr)
    assert np.all(gc < 0), f"DPO must push the chosen log-prob up (d loss / d pi_c < 0), got {gc}"
    assert np.all(gr > 0), f"DPO must push the rejected log-prob down (d loss / d pi_r > 0), got {gr}"
    h = (np64(pc) - rc) - (np64(pr) - rr)
    s = 1.0 / (1.0 + np.exp(beta * h))  # sigma(-beta h)
    close(gc, -beta * s, rtol=1e-5, atol=1e-7)
    close(gr, beta * s, rtol=1e-5, atol=1e-7)


def test_simpo_gradient_scales_with_length():
    """d/d pi_c [-log sigma(m)] = -(beta / n_c) sigma(-m) < 0."""
    pc, pr, rc, rr, nc, nr = random_batch(seed=10, b=32)
    p = pair(pc, pr, nc, nr)
    gc, _ = _grads(simpo_loss, p, (0, 1), beta=2.0, gamma_beta_ratio=0.5)
    gc = np.array(gc)
    m = 2.0 * (np64(pc) / nc - np64(pr) / nr) - 1.0
    # Where m is huge, sigma(-m) underflows float32 to 0: strictly negative only where it cannot.
    assert np.all(gc <= 0) and np.all(gc[m < 30] < 0), f"SimPO must push the chosen log-prob up, got {gc}"
    close(gc, -(2.0 / np64(nc)) / (1.0 + np.exp(m)), rtol=1e-5, atol=1e-8)

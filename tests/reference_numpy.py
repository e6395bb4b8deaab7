"""An independent float64 numpy reference for POET.md's formulas, used by the unit tests.

Written from POET.md, not from poet_mlx (nothing here imports it). Plain and direct on purpose: each
function is the formula in the spec, with no chunking, masking tricks or shared helpers.
Notation: pc, pr policy log-prob sums of chosen/rejected; rc, rr the reference's; nc, nr token counts;
beta; eps = label_smoothing. All array arguments are converted to float64.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def f64(x):
    return np.asarray(x, dtype=np.float64)


def log_sigmoid(x):
    """log sigma(x) = -log(1 + e^-x), stable for large |x|."""
    return -np.logaddexp(0.0, -f64(x))


# ---------------------------------------------------------------- log-probs


def token_logps(logits, targets):
    """log softmax(logits)[target] at every position; logits (N, T, V), targets (N, T) -> (N, T)."""
    x = f64(logits)
    x = x - x.max(axis=-1, keepdims=True)
    log_softmax = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    n, t = np.indices(np.shape(targets))
    return log_softmax[n, t, np.asarray(targets)]


def span_sums(token_logps_, starts, lengths):
    """Row i: sum of token_logps_[i, starts[i] : starts[i] + lengths[i]]."""
    rows = f64(token_logps_)
    return np.array([rows[i, s : s + n].sum() for i, (s, n) in enumerate(zip(starts, lengths))])


# ---------------------------------------------------------------- POET cut


def poet_k(chosen_len, rejected_len, ratio=1.0):
    """k = min(lengths); ablation keeps floor(r * k) (r read as the decimal it is written as), at least 1."""
    k = min(chosen_len, rejected_len)
    return max(1, math.floor(Fraction(str(ratio)) * k))


def poet_cut(chosen_ids, rejected_ids, ratio=1.0):
    k = poet_k(len(chosen_ids), len(rejected_ids), ratio)
    return list(chosen_ids)[:k], list(rejected_ids)[:k]


# ---------------------------------------------------------------- losses: each returns (loss, reward_c, reward_r)


def dpo(pc, pr, rc, rr, beta, eps=0.0):
    """-(1-eps) log sigma(beta h) - eps log sigma(-beta h), h = (pc - rc) - (pr - rr); rewards beta (pi - ref)."""
    pc, pr, rc, rr = map(f64, (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    loss = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    return loss, beta * (pc - rc), beta * (pr - rr)


def ipo(pc, pr, rc, rr, nc, nr, beta):
    """((pc - rc)/nc - (pr - rr)/nr - 1/(2 beta))^2; rewards beta * averaged log-ratios (TRL)."""
    pc, pr, rc, rr, nc, nr = map(f64, (pc, pr, rc, rr, nc, nr))
    avg_c = (pc - rc) / nc
    avg_r = (pr - rr) / nr
    return (avg_c - avg_r - 1 / (2 * beta)) ** 2, beta * avg_c, beta * avg_r


def hinge(pc, pr, rc, rr, beta):
    """max(0, 1 - beta h)."""
    pc, pr, rc, rr = map(f64, (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    return np.maximum(0.0, 1 - beta * h), beta * (pc - rc), beta * (pr - rr)


def robust(pc, pr, rc, rr, beta, eps=0.0):
    """[-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)."""
    pc, pr, rc, rr = map(f64, (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    loss = (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    return loss, beta * (pc - rc), beta * (pr - rr)


def simpo(pc, pr, nc, nr, beta, gamma_beta_ratio, eps=0.0):
    """m = beta (pc/nc - pr/nr) - gamma, gamma = gamma_beta_ratio * beta; cDPO form of -log sigma(m).

    Rewards are beta * average log-prob.
    """
    pc, pr, nc, nr = map(f64, (pc, pr, nc, nr))
    m = beta * (pc / nc - pr / nr) - gamma_beta_ratio * beta
    loss = -(1 - eps) * log_sigmoid(m) - eps * log_sigmoid(-m)
    return loss, beta * pc / nc, beta * pr / nr


def sft_term(chosen_full_logps, chosen_full_tokens, sft_weight):
    """sft_weight * mean NLL per token of the full chosen response."""
    return sft_weight * (-f64(chosen_full_logps) / f64(chosen_full_tokens))


# ---------------------------------------------------------------- metrics


def metrics(loss, reward_c, reward_r, pc, pr):
    """Per-pair values under TRL's names."""
    reward_c, reward_r = f64(reward_c), f64(reward_r)
    return {
        "loss": f64(loss),
        "rewards/chosen": reward_c,
        "rewards/rejected": reward_r,
        "rewards/margins": reward_c - reward_r,
        "rewards/accuracies": np.where(reward_c > reward_r, 1.0, 0.0),
        "logps/chosen": f64(pc),
        "logps/rejected": f64(pr),
    }

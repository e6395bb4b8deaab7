"""Every preference loss, defined once: one `LossSpec` per loss, read by config validation, the objective, the
prefix curves, the implicit judge, the model card and `poet-mlx train --help`.

A spec names its formula (a pure function of per-pair log-probs in `losses.pairwise`), whether it needs a
reference model, how its implicit reward is measured, its default beta and the knobs (LossConfig fields) it
reads. Nothing here imports MLX, so the CLI can list the losses and validate a config without loading it.

Names are TRL 1.16's: the 15 `DPOTrainer` loss types (`dpo` is kept as an alias of `sigmoid`), then SimPO,
CPO and ORPO, which TRL has in its CPO and ORPO trainers.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

REWARDS = {
    "log_ratio": "beta * (policy - reference) log-prob sums",
    "logps": "beta * policy log-prob sums",
    "mean_logps": "beta * policy log-probs averaged over the scored tokens",
}
"""How a loss measures its implicit reward (rewards/chosen, rewards/rejected, prefix curves, implicit judge)."""

KNOBS = ("label_smoothing", "gamma_beta_ratio", "sft_weight", "cpo_alpha", "discopop_tau")
"""LossConfig fields a formula may take as keyword arguments (besides beta)."""

ALIASES = {"dpo": "sigmoid"}


@dataclass(frozen=True)
class LossSpec:
    """One loss. `function` is the name of its formula in `poet_mlx.losses.pairwise`; `knobs` are exactly the
    formula's keyword arguments after beta; `nll` says when the loss adds the chosen responses' NLL (token
    mean over the batch): "always", or the knob whose value > 0 turns it on."""

    name: str
    title: str
    formula: str
    paper: str
    function: str
    reference: bool
    reward: Optional[str]
    default_beta: float
    knobs: tuple = ()
    ld_alpha: bool = False
    nll: Optional[str] = None
    trl: str = ""
    metrics: tuple = ()

    @property
    def fn(self) -> Callable:
        """The formula itself (imports MLX)."""
        return getattr(importlib.import_module("poet_mlx.losses.pairwise"), self.function)

    @property
    def averaged(self) -> bool:
        """Whether its rewards and logps/* are averages over the scored tokens (else sums)."""
        return self.reward == "mean_logps"


def _dpo(name, title, formula, paper, function, knobs=(), **kw) -> LossSpec:
    """A TRL DPOTrainer loss type: reference-based, beta 0.1, LD-DPO weighting allowed."""
    kw = {"reference": True, "reward": "log_ratio", "default_beta": 0.1, "ld_alpha": True,
          "trl": f"DPOTrainer loss_type='{name}'", **kw}
    return LossSpec(name, title, formula, paper, function, knobs=knobs, **kw)


NOTATION = ("pi, ref: policy and reference log-prob sums over the scored tokens, n: their count, l = pi - ref, "
            "h = l_c - l_r, r = beta l, s: sigmoid, L(z) = -log s(z), eps: label_smoothing, NLL: the chosen "
            "responses' negative log-likelihood")
"""The symbols of the `formula` strings."""
SPECS = (
    _dpo("sigmoid", "DPO", "L(beta h); eps > 0: (1-eps) L(beta h) + eps L(-beta h) (cDPO)",
         "Rafailov et al. 2023, arXiv 2305.18290", "sigmoid_loss", ("label_smoothing",)),
    _dpo("hinge", "hinge (SLiC)", "relu(1 - beta h)", "Zhao et al. 2023, arXiv 2305.10425", "hinge_loss"),
    _dpo("ipo", "IPO", "(l_c/n_c - l_r/n_r - 1/(2 beta))^2", "Azar et al. 2023, arXiv 2310.12036", "ipo_loss"),
    _dpo("exo_pair", "EXO", "s(beta h) log(s(beta h)/(1-eps)) + s(-beta h) log(s(-beta h)/eps), eps > 0",
         "Ji et al. 2024, arXiv 2402.00856", "exo_pair_loss", ("label_smoothing",)),
    _dpo("nca_pair", "NCA", "L(r_c) + L(-r_c)/2 + L(-r_r)/2",
         "Chen et al. 2024, arXiv 2402.05369", "nca_pair_loss"),
    _dpo("robust", "robust DPO", "[(1-eps) L(beta h) - eps L(-beta h)] / (1 - 2 eps)",
         "Chowdhury et al. 2024, arXiv 2403.00409", "robust_loss", ("label_smoothing",)),
    _dpo("bco_pair", "BCO (paired)", "L(r_c) + L(-r_r)", "Jung et al. 2024, arXiv 2404.04656",
         "bco_pair_loss"),
    _dpo("sppo_hard", "SPPO (hard)", "(l_c - 1/(2 beta))^2 + (l_r + 1/(2 beta))^2",
         "Wu et al. 2024, arXiv 2405.00675", "sppo_hard_loss"),
    _dpo("aot", "AOT (paired)",
         "(1-eps) L(beta d) + eps L(-beta d), d = sort(pi_c - pi_r) - sort(ref_c - ref_r) over the batch",
         "Melnyk et al. 2024, arXiv 2406.05882", "aot_loss", ("label_smoothing",)),
    _dpo("aot_unpaired", "AOT (unpaired)", "as aot with d = sort(l_c) - sort(l_r) over the batch",
         "Melnyk et al. 2024, arXiv 2406.05882", "aot_unpaired_loss", ("label_smoothing",)),
    _dpo("apo_zero", "APO-zero", "1 - s(r_c) + s(r_r)", "D'Oosterlinck et al. 2024, arXiv 2408.06266",
         "apo_zero_loss"),
    _dpo("apo_down", "APO-down", "s(r_c) + 1 - s(r_c - r_r)", "D'Oosterlinck et al. 2024, arXiv 2408.06266",
         "apo_down_loss"),
    _dpo("discopop", "DiscoPOP", "(1 - m) L(beta h) + m exp(-beta h), m = s(beta h / tau)",
         "Chris Lu et al. 2024, arXiv 2406.08414", "discopop_loss", ("discopop_tau",)),
    _dpo("sft", "SFT", "NLL of the chosen responses (token mean over the batch)", "-", "sft_loss",
         reference=False, reward=None, ld_alpha=False, nll="always"),
    _dpo("sigmoid_norm", "DPO (length-normalized)", "L(beta (l_c/n_c - l_r/n_r))",
         "TRL's length-normalized DPO", "sigmoid_norm_loss"),
    LossSpec("simpo", "SimPO", "L(beta (pi_c/n_c - pi_r/n_r) - gamma) + sft_weight NLL, "
             "gamma = gamma_beta_ratio beta", "Meng et al. 2024, arXiv 2405.14734", "simpo_loss", False,
             "mean_logps", 2.0, ("gamma_beta_ratio", "label_smoothing", "sft_weight"), nll="sft_weight",
             trl="CPOTrainer loss_type='simpo' (simpo_gamma = gamma)"),
    LossSpec("cpo", "CPO", "L(beta (pi_c - pi_r)) + cpo_alpha NLL (eps: cDPO form)", "Xu et al. 2024, arXiv 2401.08417",
             "cpo_loss", False, "logps", 0.1, ("label_smoothing", "cpo_alpha"), nll="cpo_alpha",
             trl="CPOTrainer loss_type='sigmoid'"),
    LossSpec("orpo", "ORPO", "NLL + beta L(log odds(p_c) - log odds(p_r)), p = exp(pi/n), odds = p/(1-p)",
             "Hong et al. 2024, arXiv 2403.07691", "orpo_loss", False, "mean_logps", 0.1, nll="always",
             trl="ORPOTrainer", metrics=("log_odds_ratio", "log_odds_chosen")),
)
LOSS_SPECS = {s.name: s for s in SPECS}
LOSS_NAMES = tuple(LOSS_SPECS) + tuple(ALIASES)
"""Every accepted name: TRL's loss types, simpo, cpo, orpo, and the alias dpo."""


def spec(name: str) -> LossSpec:
    """The spec of a loss name or alias; KeyError for an unknown one."""
    return LOSS_SPECS[ALIASES.get(name, name)]


def split_names(loss: str) -> list[str]:
    """`"sigmoid bco_pair sft"` (or comma-separated) -> its names, as written."""
    return [n for n in re.split(r"[\s,]+", loss.strip()) if n]


@dataclass(frozen=True)
class Mixture:
    """A weighted sum of losses with the knobs they read: what `pairwise` formulas are called with.

    terms: (spec, weight) per loss; beta: the resolved beta; knobs: every KNOBS value; reward: the implicit
    reward all terms share (REWARDS key); nll_weight: the weight of the chosen NLL term in the sum (0 = none).
    """

    terms: tuple
    beta: float
    knobs: dict = field(default_factory=dict)
    reward: str = "log_ratio"

    @property
    def names(self) -> tuple:
        return tuple(s.name for s, _ in self.terms)

    @property
    def needs_reference(self) -> bool:
        return any(s.reference for s, _ in self.terms)

    @property
    def uses_nll(self) -> bool:
        """Whether some term adds the chosen NLL (then the full chosen responses are scored, and logged)."""
        return any(s.nll == "always" or (s.nll and self.knobs.get(s.nll, 0) > 0) for s, _ in self.terms)

    @property
    def averaged(self) -> bool:
        return self.reward == "mean_logps"


def shared_reward(specs) -> str:
    """The implicit reward of a mix: the one kind its terms share (an NLL-only term adopts the others');
    ValueError when two terms measure rewards differently."""
    kinds = {s.reward for s in specs if s.reward}
    if len(kinds) > 1:
        detail = ", ".join(f"{s.name}: {REWARDS[s.reward]}" for s in specs if s.reward)
        raise ValueError(f"these losses measure rewards differently ({detail}); mix only losses of one kind")
    return kinds.pop() if kinds else "logps"


def default_beta(specs) -> Optional[float]:
    """The default beta the specs agree on (an NLL-only term, whose beta only scales the logged rewards, adopts
    the others'), or None when they disagree."""
    betas = {s.default_beta for s in specs if s.reward} or {s.default_beta for s in specs}
    return betas.pop() if len(betas) == 1 else None


def reward_of(loss: str) -> str:
    """The REWARDS kind of a loss setting (one name or several); unknown names count as DPO's."""
    try:
        return shared_reward([spec(n) for n in split_names(loss)])
    except (KeyError, ValueError):
        return "log_ratio"


def title_of(loss: str, weights=None) -> str:
    """Human name of a loss setting: "DPO", "0.8 DPO + 0.2 BCO (paired) + 1 SFT"."""
    names = split_names(loss or "")
    titles = [LOSS_SPECS[ALIASES.get(n, n)].title if ALIASES.get(n, n) in LOSS_SPECS else n for n in names]
    if weights and len(weights) == len(titles) and len(titles) > 1:
        titles = [f"{w:g} {t}" for w, t in zip(weights, titles)]
    return " + ".join(titles) or "preference training"


def _knob_users(knob: str) -> list[str]:
    return [s.name for s in LOSS_SPECS.values() if knob in s.knobs or (knob == "ld_alpha" and s.ld_alpha)]


def loss_problem(ls, defaults: dict, ref_model: Optional[str] = None) -> Optional[tuple[str, str]]:
    """The first mistake in the loss settings `ls` (a `config.LossConfig`, whose field defaults are `defaults`),
    as (key, hint), or None. A knob set away from its default that no loss of the mix reads is a mistake: it
    would be silently ignored."""
    specs = ls.specs
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        return "loss", f"names a loss twice ({', '.join(ALIASES)} = {', '.join(ALIASES.values())})"
    if ls.loss_weights is not None and len(ls.loss_weights) != len(specs):
        return "loss_weights", f"needs one weight per loss ({len(specs)} for {ls.loss})"
    if ls.loss_weights is not None and not all(math.isfinite(w) and w > 0 for w in ls.loss_weights):
        return "loss_weights", "must be finite and > 0"
    try:
        ls.reward
    except ValueError as exc:
        return "loss", str(exc)
    if ls.beta is None and default_beta(specs) is None:
        betas = ", ".join(f"{s.name} {s.default_beta:g}" for s in specs)
        return "beta", f"has no common default for {ls.loss} ({betas}); pass --beta"
    for knob in ("gamma_beta_ratio", "label_smoothing", "sft_weight", "cpo_alpha", "discopop_tau", "ld_alpha"):
        if getattr(ls, knob) != defaults[knob] and not set(names) & set(_knob_users(knob)):
            return knob, f"is not used by --loss {ls.loss}; it applies to {', '.join(_knob_users(knob))}"
    if "exo_pair" in names and ls.label_smoothing <= 0:
        return "label_smoothing", "must be > 0 for exo_pair (EXO's eps; its paper suggests 1e-3)"
    if ls.ld_alpha is not None and ls.poet:
        return "ld_alpha", ("and poet exclude each other: POET already scores only the shared prefix (it is LD-DPO "
                            "with ld_alpha 0)")
    if ref_model and not ls.needs_reference:
        return "ref_model", f"is unused by --loss {ls.loss}, which has no reference model; drop it"
    return None

"""`poet-mlx eval` as a library call: held-out preference metrics of the base model or of trained runs, with
the optional analyses of the reward-generation gap (prefix curves, entropy, judged generations).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..adapters import ADAPTER_CONFIG, load_adapters
from ..batching import pair_set, poet_stats
from ..config import RunConfig
from ..data.splits import eval_splits, read_split, tokenize_split
from ..data.tokenization import pad_id
from ..errors import PoetError
from ..models import load_model
from ..reporting import Reporter
from ..train.checkpoint import saved_config
from ..train.reference import fill_reference


@dataclass
class EvalResult:
    """What `run_evaluation` measured. It unpacks as `(means, rows)` of the first model evaluated.

    runs: label -> means of every model evaluated, in order (the base, or each run). curves: a
    `prefix.PrefixCurve` per model (prefix_curve). entropy: `entropy.entropy_profile`s, the base's first
    ("before"), then each run's. win_rates: run label -> `generation.WinRate` over the base. samples:
    `generation.Sample`s, the base's first, then each run's. judge: the judge's name (generation).
    """

    means: dict
    rows: list
    runs: dict
    curves: list
    entropy: list
    win_rates: dict
    samples: list
    judge: Optional[str] = None

    def __iter__(self):  # `means, rows = run_evaluation(...)` keeps working
        return iter((self.means, self.rows))


def run_evaluation(cfg: RunConfig, adapter_path: Optional[str], reporter: Reporter | None = None, *,
                   compare=(), prefix_curve: bool = False, entropy: bool = False, generation=None) -> EvalResult:
    """Held-out metrics of the base model, or of the base plus adapters, or of several runs on the same pairs.

    The reference (DPO family) is the base model with no adapters (or --ref-model); with --poet the pairs
    are cut exactly as in training. `means` averages the TRL metrics; `rows` holds one dict per kept pair, in
    input order, with the row's `index` in its source. Each run of [adapter_path, *compare] gets its adapters
    on a fresh copy of the base model; `cfg`'s loss settings apply to all.

    Args:
        prefix_curve: add each model's implicit-reward accuracy and margin by prefix length (`prefix`).
        entropy: add next-token entropy by response position, of the base (adapters off) and of each run.
        generation: a `generation.GenerationOptions`: sample replies for the first N prompts from the base
            (adapters off) and from each run, judge them, and give each run's win rate over the base.
    """
    reporter = reporter or Reporter()
    runs = [str(r) for r in (adapter_path, *compare) if r]
    if generation is not None and not runs:
        raise PoetError("--generate compares a trained run's replies with its base model's: pass --adapter-path "
                        "RUN (and --compare RUN2 ... for more runs)")
    _check_runs(runs, cfg, reporter)  # before the model loads
    judge = None
    if generation is not None:
        from .judges import load_judge

        judge = load_judge(generation.judge)
    reporter.phase("loading model", 0, None)
    model, tokenizer, path = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
    reporter.phase("loading model", 1, 1)
    data, rows = _eval_data(cfg, tokenizer, reporter)
    s = pair_set(data.pairs, cfg.loss)
    if cfg.loss.needs_reference:
        _reference(s, cfg, runs, model, path, tokenizer, reporter)
    labels = _run_labels(runs) if runs else ["base"]
    result = EvalResult({}, [], {}, [], [], {}, [], judge.name if judge else None)
    for i, (label, run) in enumerate(zip(labels, runs or [None])):
        if i:
            del model
            gc.collect()
            model, _, _ = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
        if run:
            load_adapters(model, run)
        _score_run(model, s, label, run, cfg, tokenizer, reporter, result, first=i == 0)
        if prefix_curve or entropy:
            _token_analyses(model, run, label, s, cfg.loss, cfg, tokenizer, reporter, result, prefix_curve,
                            entropy, first=i == 0)
        if generation is not None:
            _generation_check(model, label, s, rows, tokenizer, generation, judge, reporter, result)
    return result


def _reference(s, cfg: RunConfig, runs: list, model, path, tokenizer, reporter) -> None:
    """The reference of the evaluated runs: --ref-model; else the start they were trained from: the base
    model, or base + the --init-adapter they all started from (their reference in training too)."""
    starts = {_saved(run).get("init_adapter") for run in runs}
    init = starts.pop() if len(starts) == 1 and not cfg.model.ref_model else None
    if len(starts) > 0 and not cfg.model.ref_model:
        reporter.warning("the runs started from different --init-adapter folders: all are scored against the base")
    if not init:
        fill_reference({"eval": s}, cfg, model, path, tokenizer, reporter)
        return
    from dataclasses import replace

    from ..export.peft_import import read_adapter
    from ..train.run import attach_start

    start, _, _ = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
    start_cfg = replace(cfg, lora=replace(cfg.lora, init_adapter=init))
    start_cfg = attach_start(start_cfg, start, read_adapter(init))[0]
    fill_reference({"eval": s}, start_cfg, start, path, tokenizer, reporter)
    del start
    gc.collect()


def _saved(run: str) -> dict:
    try:
        return saved_config(Path(run))
    except PoetError:
        return {}  # mlx-lm's own adapters: no poet-mlx settings


def _eval_data(cfg: RunConfig, tokenizer, reporter: Reporter) -> tuple:
    """(SplitData, rows) of the first split `eval_splits` finds; PoetError when there is none."""
    for split in eval_splits(cfg.data.data):
        loaded = read_split(cfg, split, reporter)
        if loaded is not None:
            return tokenize_split(cfg, *loaded, tokenizer, split, reporter), loaded[0]
    raise PoetError(f"no evaluation data in {cfg.data.data}")


def _score_run(model, s, label, run, cfg: RunConfig, tokenizer, reporter, result: "EvalResult", first: bool) -> None:
    """The training objective's metrics of one model on every pair, into `result` (rows for the first)."""
    from ..train.evaluation import evaluate

    name = "evaluating" + (f" {label}" if run else "")
    means, per_pair = evaluate(model, s, cfg.loss, cfg.train.batch_size, pad_id(tokenizer),
                               progress=lambda d, tot: reporter.phase(name, d, tot))
    means.update({"pairs": len(s), **poet_stats([s])})
    if first:
        result.means = means
        result.rows = [{"index": p.index, **{k: float(v[j]) for k, v in per_pair.items()}}
                       for j, p in enumerate(s.pairs)]
    result.runs[label] = means


def _check_runs(runs: list, cfg: RunConfig, reporter: Reporter) -> None:
    """Every run folder holds adapters; a run trained on another base model than --model gets a warning."""
    from ..adapters import ADAPTER_FILE

    for run in runs:
        if not (Path(run) / ADAPTER_CONFIG).is_file() or not (Path(run) / ADAPTER_FILE).is_file():
            raise PoetError(f"no adapters in {run}: expected {ADAPTER_CONFIG} and {ADAPTER_FILE} (the "
                            "--adapter-path of a finished or checkpointed run)")
        try:
            trained_on = str(saved_config(Path(run)).get("model"))
        except PoetError:
            continue  # mlx-lm's own adapters: no poet-mlx settings to compare
        if trained_on != cfg.model.model and Path(trained_on).resolve() != Path(cfg.model.model).resolve():
            reporter.warning(f"{run} was trained on {trained_on}, but its adapters are evaluated on "
                             f"{cfg.model.model}; --model must be the run's base model")


def _run_labels(runs: list) -> list[str]:
    """Short names for run folders: the folder name, or the path where two names clash."""
    names = [Path(r).name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def _token_analyses(model, run, label, s, objective, cfg, tokenizer, reporter, result, curve: bool,
                    entropy: bool, first: bool) -> None:
    """Prefix curve and entropy profile of one model from one forward over the full responses (and, for the
    first run, the base's entropy with the adapters off)."""
    from ..adapters import adapters_disabled
    from ..scoring import pair_token_logps
    from .entropy import entropy_profile
    from .prefix import prefix_curve

    pad, bs = pad_id(tokenizer), cfg.train.batch_size
    if entropy and first and run:
        name = "entropy (base)"
        with adapters_disabled(model):
            _, ent = pair_token_logps(model, s.pairs, bs, pad, entropy=True,
                                      progress=lambda d, t: reporter.phase(name, d, t))
        result.entropy.append(entropy_profile(ent, "base"))
    name = f"token log-probs ({label})"
    logps, ent = pair_token_logps(model, s.pairs, bs, pad, entropy=entropy,
                                      progress=lambda d, t: reporter.phase(name, d, t))
    if ent is not None:
        result.entropy.append(entropy_profile(ent, label))
    if not curve:
        return
    if objective.needs_reference and not run and not cfg.model.ref_model:
        reporter.warning("the base model is its own DPO reference, so its implicit rewards are all 0 (accuracy "
                         "0 by TRL's strict rule); --loss simpo, or --ref-model, shows the base model's own "
                         "preference")
        logps = s.ref  # exactly the reference: margins exactly 0, not rounding noise
    pc = prefix_curve(logps, s.ref, objective.loss, objective.resolved_beta, label=label)
    pc.meta = {"data": cfg.data.data, "model": cfg.model.model, "run": run}
    result.curves.append(pc)


def _generation_check(model, label, s, rows, tokenizer, opts, judge, reporter, result) -> None:
    """Sample the base's replies once (adapters off), this run's replies, judge both, and count wins."""
    from ..adapters import adapters_disabled
    from .generations import generate_samples, generation_prompts, win_rate

    prompts = generation_prompts(rows, s.pairs, opts.prompts)
    if not result.samples:
        with adapters_disabled(model):
            base = generate_samples(model, tokenizer, prompts, "base", opts,
                                    progress=lambda d, t: reporter.phase("sampling (base)", d, t))
        _judge(judge, base, tokenizer, reporter)
        result.samples.extend(base)
    aligned = generate_samples(model, tokenizer, prompts, label, opts,
                               progress=lambda d, t: reporter.phase(f"sampling ({label})", d, t))
    _judge(judge, aligned, tokenizer, reporter)
    result.samples.extend(aligned)
    base_scores = [x.score for x in result.samples if x.model == "base"]
    result.win_rates[label] = win_rate([x.score for x in aligned], base_scores)


def _judge(judge, samples, tokenizer, reporter) -> None:
    reporter.phase(f"judging ({judge.name})", 0, len(samples))
    for x, score in zip(samples, judge.score(samples, tokenizer)):
        x.score = score
    reporter.phase(f"judging ({judge.name})", len(samples), len(samples))

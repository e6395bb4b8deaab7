"""End-to-end jobs shared by the commands: data -> tokens -> POET layouts -> reference -> train / evaluate.

`run_training` and `run_evaluation` are the library entry points of `poet-mlx train` and `poet-mlx eval`;
they report through a `Reporter` and return plain dicts, so the CLI, the demo and tests drive them alike.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import __version__
from ..batching import layout
from ..config import RunConfig
from ..data.tokenization import TokenizeReport, tokenize_pairs
from ..errors import PoetError
from ..fsutil import write_json_atomic
from ..models import (
    ADAPTER_CONFIG,
    adapter_config,
    attach_trainable,
    load_adapters,
    load_model,
    lora_parameters,
    model_facts,
)
from ..objective import Objective
from ..reporting import Reporter
from .checkpoint import check_run_folder, discard_unfinished_start, prepare_run_folder, resume_command

REFERENCE_BATCH = 8


@dataclass
class SplitData:
    """One split after loading and tokenization, with what was cut or dropped."""

    pairs: list
    rows_read: int
    rows_skipped: int
    format: str
    tokenize: TokenizeReport
    notes: list


def load_pairs(cfg: RunConfig, tokenizer, split: str, reporter: Reporter) -> Optional[SplitData]:
    """Load and tokenize one split; None when a valid/test split does not exist."""
    loaded = read_split(cfg, split, reporter)
    return None if loaded is None else tokenize_split(cfg, *loaded, tokenizer, split, reporter)


def read_split(cfg: RunConfig, split: str, reporter: Reporter) -> Optional[tuple]:
    """The validated rows of one split and their LoadReport (no tokenizer needed: data mistakes surface
    before a model loads); None when a valid/test split does not exist."""
    from ..data.sources import load_split

    reporter.phase(f"loading {split} data", 0, None)
    rows, load_report = load_split(cfg.data, split)
    reporter.phase(f"loading {split} data", 1, 1, note=f"{load_report.rows_read} rows ({load_report.format})")
    return (rows, load_report) if rows else None


def tokenize_split(cfg: RunConfig, rows: list, load_report, tokenizer, split: str, reporter: Reporter) -> SplitData:
    """Tokenize the rows of `read_split`; PoetError when the length limits drop every pair."""
    d = cfg.data
    if split == "valid" and d.max_valid_pairs:
        rows = rows[: d.max_valid_pairs]
    name = f"tokenizing {split}"
    pairs, tok = tokenize_pairs(rows, tokenizer, d.max_length, d.max_prompt_length, d.chat_template,
                                progress=lambda done, total: reporter.phase(name, done, total))
    if not pairs:
        reasons = "; ".join(f"{n} {why}" for why, n in tok.dropped.items())
        raise PoetError(f"all {len(rows)} {split} pairs were dropped by the length limits ({reasons}); raise "
                        f"--max-length (now {d.max_length}) or --max-prompt-length (now {d.max_prompt_length})")
    return SplitData(pairs, load_report.rows_read, load_report.rows_skipped, load_report.format, tok,
                     list(load_report.notes) + list(load_report.problems))


def pair_set(pairs, cfg: RunConfig, objective: Objective):
    """PairSet with POET layouts (reference filled in later)."""
    from .trainer import PairSet

    ls = cfg.loss
    layouts = [layout(p, ls.poet, ls.poet_ratio, objective.needs_full_chosen) for p in pairs]
    return PairSet(pairs, layouts)


def poet_stats(pair_sets) -> dict:
    """Response tokens per pair without and with the cut: what POET saves on this data."""
    full = sum(len(p.chosen) + len(p.rejected) for s in pair_sets for p in s.pairs)
    kept = sum(lay.keep_chosen + lay.keep_rejected for s in pair_sets for lay in s.layouts)
    cut = sum(1 for s in pair_sets for p, lay in zip(s.pairs, s.layouts)
              if lay.keep_chosen < len(p.chosen) or lay.keep_rejected < len(p.rejected))
    n = max(1, sum(len(s) for s in pair_sets))
    return {"pairs_cut_by_poet": cut, "response_tokens_per_pair": full / n,
            "scored_tokens_per_pair": kept / n, "poet_token_saving": 1.0 - kept / max(1, full)}


def fill_reference(sets, cfg: RunConfig, policy, policy_path, tokenizer, reporter: Reporter, world=None) -> None:
    """Reference per-token log-probs for every PairSet in `sets` (DPO family only).

    With no --ref-model the policy scores them now, before any update, when it still equals the base.
    """
    from .reference import reference_token_logps

    model, path = policy, policy_path
    if cfg.model.ref_model:
        reporter.phase("loading reference model", 0, None)
        model, ref_tok, path = load_model(cfg.model.ref_model, trust_remote_code=cfg.model.trust_remote_code)
        if ref_tok.vocab_size != tokenizer.vocab_size:
            raise PoetError(f"--ref-model {cfg.model.ref_model} has a different vocabulary "
                            f"({ref_tok.vocab_size} vs {tokenizer.vocab_size}); it must share the tokenizer")
        reporter.phase("loading reference model", 1, 1)
    was_training = getattr(model, "training", False)
    model.eval()
    for name, s in sets.items():
        label = f"reference log-probs ({name})"
        reporter.phase(label, 0, len(s))
        s.ref, reused = reference_token_logps(model, path, s.pairs, REFERENCE_BATCH, pad_id(tokenizer),
                                              progress=lambda d, t: d < t and reporter.phase(label, d, t),
                                              world=world)
        reporter.phase(label, len(s), len(s), note="reused from cache" if reused else "computed")
    if model is not policy:
        del model
        gc.collect()
    elif was_training:
        policy.train()


def pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid if pid is not None else tokenizer.eos_token_id or 0)


def saved_config(run: Path) -> dict:
    """The flat config a run folder was started with."""
    path = Path(run) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())["poet_mlx"]["config"]
    except (OSError, ValueError, KeyError):
        raise PoetError(f"{path} is missing or has no poet_mlx settings: not a poet-mlx run folder") from None


def run_training(cfg: RunConfig, reporter: Reporter | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train adapters as `cfg` says, into cfg.train.adapter_path. Returns the run summary."""
    import mlx.core as mx

    from ..data.preflight import memory_warning
    from ..data.sources import check_source
    from ..models import resolve_model_path
    from .distributed import check_batch_divides, check_same_everywhere, init_world
    from .reference import pairs_digest
    from .trainer import Trainer

    t, run = cfg.train, Path(cfg.train.adapter_path)
    world = init_world()
    # Data parallel (mlx.launch): rank 0 alone draws, logs and writes the run folder.
    reporter = (reporter or Reporter()) if world.is_main else Reporter()
    check_batch_divides(t.batch_size, world)
    # Everything the user can get wrong is checked before the model loads and before the run folder is
    # touched: a failed start writes nothing, and --overwrite deletes the old run only once this one can start.
    check_source(cfg.data)
    if Path(cfg.model.model).expanduser().exists():
        resolve_model_path(cfg.model.model)  # a local folder that is not a model: say so before reading data
    if world.is_main:
        check_run_folder(run, t.resume, t.overwrite)
    rows = {split: read_split(cfg, split, reporter) for split in ("train", "valid")}
    if rows["train"] is None:
        raise PoetError(f"no training data found in {cfg.data.data}")
    reporter.phase("loading model", 0, None)
    model, tokenizer, path = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
    reporter.phase("loading model", 1, 1)
    objective = Objective.from_config(cfg.loss)
    train = tokenize_split(cfg, *rows["train"], tokenizer, "train", reporter)
    valid = tokenize_split(cfg, *rows["valid"], tokenizer, "valid", reporter) if rows["valid"] else None
    check_same_everywhere("settings and data", lambda: json.dumps(cfg.to_flat(), sort_keys=True)
                          + pairs_digest(train.pairs) + (pairs_digest(valid.pairs) if valid else ""), world)
    mx.random.seed(t.seed)
    lora = cfg.lora
    params = lora_parameters(lora.rank, lora.scale, lora.dropout, lora.keys)
    n_layers = attach_trainable(model, lora.fine_tune_type, lora.num_layers, params)
    sets = {"train": pair_set(train.pairs, cfg, objective)}
    if valid is not None:
        sets["valid"] = pair_set(valid.pairs, cfg, objective)
    adapter_cfg = adapter_config(lora.fine_tune_type, n_layers, params, cfg.model.model,
                                 {"version": __version__, "config": cfg.to_flat()})
    early_warnings = [w for w in [memory_warning(model, path, cfg, sets["train"])] if w]
    for warning in early_warnings:
        reporter.warning(warning)
    if objective.needs_reference:
        fill_reference(sets, cfg, model, path, tokenizer, reporter, world)
    facts = model_facts(model, path)
    header = _header(cfg, facts, objective, train, valid, poet_stats(sets.values()))
    header["ranks"] = world.size
    created = not run.exists()
    if world.is_main:
        for note in prepare_run_folder(run, t.resume, t.overwrite):
            early_warnings.append(note)
            reporter.warning(note)
    try:
        if world.is_main:
            write_json_atomic(run / ADAPTER_CONFIG, adapter_cfg)
        reporter.header(header)
        trainer = Trainer(model, objective, t, sets["train"], sets.get("valid"), run, adapter_cfg, reporter,
                          pad_id(tokenizer), should_stop, world)
        summary = trainer.fit(resume=t.resume)
    except BaseException:
        if not t.resume and world.is_main:  # a start that never reached a checkpoint leaves nothing behind
            discard_unfinished_start(run, created)
        raise
    summary.update({"header": header, "resume_command": resume_command(run),
                    "warnings": early_warnings + summary["warnings"]})
    reporter.done(summary)
    return summary


def _header(cfg: RunConfig, facts, objective: Objective, train: SplitData, valid: Optional[SplitData],
            poet: dict) -> dict:
    ls, lo = cfg.loss, cfg.lora
    return {
        "model": cfg.model.model,
        "model_type": facts.model_type,
        "quantization": facts.quantization or "none",
        "total_params": facts.total_params,
        "trainable_params": facts.trainable_params,
        "loss": objective.loss,
        "beta": objective.beta,
        "gamma_beta_ratio": objective.gamma_beta_ratio if objective.loss == "simpo" else None,
        "label_smoothing": objective.label_smoothing,
        "poet": ls.poet,
        "poet_ratio": ls.poet_ratio,
        "fine_tune_type": lo.fine_tune_type,
        "rank": lo.rank,
        "num_layers": lo.num_layers,
        "keys": lo.keys or "all linear",
        "train_pairs": len(train.pairs),
        "valid_pairs": len(valid.pairs) if valid else 0,
        "data_format": train.format,
        "rows_skipped": train.rows_skipped + (valid.rows_skipped if valid else 0),
        "length_report": train.tokenize.summary(),
        "data_notes": train.notes,
        **poet,
    }


def eval_splits(data: str) -> tuple[str, ...]:
    """Which splits `poet-mlx eval --data X` reads: a file is scored whole; a folder's test split first."""
    path = Path(data).expanduser()
    if path.is_file():
        return ("train",)
    if path.is_dir():
        return ("test", "valid", "train")
    return ("valid",)


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
    from .evaluation import evaluate

    reporter = reporter or Reporter()
    runs = [str(r) for r in (adapter_path, *compare) if r]
    if generation is not None and not runs:
        raise PoetError("--generate compares a trained run's replies with its base model's: pass --adapter-path "
                        "RUN (and --compare RUN2 ... for more runs)")
    _check_runs(runs, cfg, reporter)  # before the model loads
    judge = None
    if generation is not None:
        from ..analysis.generations import load_judge

        judge = load_judge(generation.judge)
    reporter.phase("loading model", 0, None)
    model, tokenizer, path = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
    reporter.phase("loading model", 1, 1)
    objective = Objective.from_config(cfg.loss)
    data = loaded = None
    for split in eval_splits(cfg.data.data):
        loaded = read_split(cfg, split, reporter)
        if loaded is not None:
            data = tokenize_split(cfg, *loaded, tokenizer, split, reporter)
            break
    if data is None:
        raise PoetError(f"no evaluation data in {cfg.data.data}")
    s = pair_set(data.pairs, cfg, objective)
    if objective.needs_reference:
        fill_reference({"eval": s}, cfg, model, path, tokenizer, reporter)
    labels = _run_labels(runs) if runs else ["base"]
    result = EvalResult({}, [], {}, [], [], {}, [], judge.name if judge else None)
    for i, (label, run) in enumerate(zip(labels, runs or [None])):
        if i:
            del model
            gc.collect()
            model, _, _ = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
        if run:
            load_adapters(model, run)
        name = "evaluating" + (f" {label}" if run else "")
        means, per_pair = evaluate(model, s, objective, cfg.train.batch_size, pad_id(tokenizer),
                                   progress=lambda d, tot: reporter.phase(name, d, tot))
        means.update({"pairs": len(s), **poet_stats([s])})
        if i == 0:
            result.means = means
            result.rows = [{"index": p.index, **{k: float(v[j]) for k, v in per_pair.items()}}
                           for j, p in enumerate(s.pairs)]
        result.runs[label] = means
        if prefix_curve or entropy:
            _token_analyses(model, run, label, s, objective, cfg, tokenizer, reporter, result, prefix_curve,
                            entropy, first=i == 0)
        if generation is not None:
            _generation_check(model, label, s, loaded[0], tokenizer, generation, judge, reporter, result)
    return result


def _check_runs(runs: list, cfg: RunConfig, reporter: Reporter) -> None:
    """Every run folder holds adapters; a run trained on another base model than --model gets a warning."""
    from ..models import ADAPTER_FILE

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
    from ..analysis.entropy import entropy_profile, response_token_stats
    from ..analysis.prefix import prefix_curve
    from ..models import adapters_disabled

    pad, bs = pad_id(tokenizer), cfg.train.batch_size
    if entropy and first and run:
        name = "entropy (base)"
        with adapters_disabled(model):
            _, ent = response_token_stats(model, s.pairs, bs, pad, progress=lambda d, t: reporter.phase(name, d, t))
        result.entropy.append(entropy_profile(ent, "base"))
    name = f"token log-probs ({label})"
    logps, ent = response_token_stats(model, s.pairs, bs, pad, entropy=entropy,
                                      progress=lambda d, t: reporter.phase(name, d, t))
    if ent is not None:
        result.entropy.append(entropy_profile(ent, label))
    if not curve:
        return
    if objective.needs_reference and not run:
        reporter.warning("the base model is its own DPO reference, so its implicit rewards are all 0 (accuracy "
                         "0 by TRL's strict rule); --loss simpo shows the base model's own preference")
        logps = s.ref  # exactly the reference: margins exactly 0, not rounding noise
    pc = prefix_curve(logps, s.ref, objective.loss, objective.beta, label=label)
    pc.meta = {"data": cfg.data.data, "model": cfg.model.model, "run": run}
    result.curves.append(pc)


def _generation_check(model, label, s, rows, tokenizer, opts, judge, reporter, result) -> None:
    """Sample the base's replies once (adapters off), this run's replies, judge both, and count wins."""
    from ..analysis.generations import generate_samples, generation_prompts, win_rate
    from ..models import adapters_disabled

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

"""The training loop: compiled steps, accumulation, clipping, schedule, validation, checkpoints, resume.

The trainer orchestrates; the math lives in `objective`, `losses`, `logprobs` and `poet`. It talks to the
outside only through a `Reporter` and the run folder, and stops between steps when `should_stop()` says so
(the CLI wires that to SIGINT/SIGTERM), saving a checkpoint first.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .batching import Layout, PairBatch, epoch_batches, make_batch
from .checkpoint import MetricsLog, latest_checkpoint, load_checkpoint, resume_command, save_checkpoint, write_error
from .config import TrainConfig
from .errors import PoetError
from .evaluation import evaluate
from .models import ADAPTER_CONFIG, ADAPTER_FILE, enable_grad_checkpoint, save_adapters, trainable_weights
from .objective import Objective, batch_objective
from .reference import TokenLogps
from .reporting import Reporter
from .tokenization import TokenizedPair

LEARNING_PATIENCE = 10
"""Steps of evidence before the run warns that nothing is learning (zero gradients, still adapters, flat loss),
and consecutive non-finite batches before --skip-nonfinite gives up."""
LOSS_FLAT_TOL = 1e-5
"""Per-step losses that stay within this band for LEARNING_PATIENCE steps count as flat. Float32 rounding
between the reference pass and the policy moves DPO's initial loss by ~3e-6 (measured on the tiny model),
so the band sits above that and far below any change that training makes."""
ADAPTER_STILL_REL = 1e-7
"""Adapter change below this fraction of the initial trainable norm is no change (float32 resolution)."""
MAX_WARNINGS_KEPT = 20


@dataclass
class PairSet:
    """Tokenized pairs with their POET layouts and (DPO) reference per-token log-probs."""

    pairs: Sequence[TokenizedPair]
    layouts: Sequence[Layout]
    ref: Optional[TokenLogps] = None

    def __len__(self):
        return len(self.pairs)

    def batch(self, indices, pad_id: int) -> PairBatch:
        return make_batch(self.pairs, indices, self.layouts, self.ref, pad_id=pad_id)


@dataclass
class TrainState:
    """Counters that a checkpoint restores so a resumed run continues exactly."""

    step: int = 0
    micro: int = 0
    tokens: int = 0
    scored_tokens: int = 0
    pairs: int = 0
    train_seconds: float = 0.0
    best: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    zero_grad_steps: int = 0
    nonfinite_skipped: int = 0
    warnings: list = field(default_factory=list)
    """{"step", "kind", "message"} of every warning so far (the first MAX_WARNINGS_KEPT)."""


class LearningWatch:
    """Decides, step by step, whether a run visibly learns nothing. Pure bookkeeping: no MLX, no I/O.

    Each kind of warning fires once per run: `zero_grad` (gradient norm exactly 0 for `patience` steps),
    `flat_loss` (per-step loss within LOSS_FLAT_TOL for `patience` steps), `adapters_still` (adapter change
    below ADAPTER_STILL_REL of the initial norm after `patience` steps).
    """

    def __init__(self, patience: Optional[int] = None, warned=()):
        self.patience = patience or LEARNING_PATIENCE
        self.warned = set(warned)
        self.zero_grad_steps = 0
        self.losses: deque = deque(maxlen=self.patience)

    def observe(self, loss: float, grad_norm: float) -> list[tuple[str, str]]:
        """Feed one applied step; returns new (kind, message) warnings."""
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0 else 0
        self.losses.append(loss)
        found = []
        if self.zero_grad_steps >= self.patience:
            found.append(("zero_grad", f"gradient norm has been zero for {self.patience} steps: nothing is "
                                       "learning (are the adapters attached? is the learning rate 0?)"))
        if len(self.losses) == self.patience and max(self.losses) - min(self.losses) <= LOSS_FLAT_TOL:
            found.append(("flat_loss", f"the loss has not moved for {self.patience} steps (stays at "
                                       f"{loss:.6g} within {LOSS_FLAT_TOL:g}): nothing is learning; raise "
                                       "--learning-rate or check that chosen and rejected differ"))
        return self._new(found)

    def adapters(self, steps: int, change: float, initial_norm: float) -> list[tuple[str, str]]:
        """Check the adapter change after `steps` applied steps (call once steps >= patience)."""
        if change > ADAPTER_STILL_REL * max(initial_norm, 1e-30):
            return []
        return self._new([("adapters_still", f"the adapters have not changed after {steps} steps (change "
                                             f"{change:.3g}): nothing is learning; raise --learning-rate")])

    def _new(self, found):
        new = [(k, m) for k, m in found if k not in self.warned]
        self.warned.update(k for k, _ in new)
        return new


def total_steps(cfg: TrainConfig, num_pairs: int) -> int:
    batches = math.ceil(num_pairs / cfg.batch_size)
    if cfg.iters:
        return cfg.iters
    return max(1, math.ceil(cfg.epochs * batches / cfg.grad_accumulation_steps))


def lr_schedule(peak: float, steps: int, warmup_ratio: float, kind: str) -> Callable:
    """Linear warmup (first update at peak / (w + 1), not 0) then cosine/linear decay to 0, or constant."""
    warmup = int(round(warmup_ratio * steps))
    decay_steps = max(1, steps - warmup)

    def schedule(step):
        step = step.astype(mx.float32) if isinstance(step, mx.array) else mx.array(step, mx.float32)
        warm = peak * (step + 1) / (warmup + 1)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = peak * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif kind == "linear":
            decayed = peak * (1.0 - progress)
        else:
            decayed = mx.array(peak, mx.float32)
        return mx.where(step < warmup, warm, decayed)

    return schedule


def build_optimizer(cfg: TrainConfig, steps: int):
    lr = lr_schedule(cfg.learning_rate, steps, cfg.warmup_ratio, cfg.lr_schedule)
    kinds = {
        "adamw": lambda: optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay),
        "adam": lambda: optim.Adam(learning_rate=lr),
        "sgd": lambda: optim.SGD(learning_rate=lr),
        "adafactor": lambda: optim.Adafactor(learning_rate=lr),
        "lion": lambda: optim.Lion(learning_rate=lr, weight_decay=cfg.weight_decay),
        "muon": lambda: optim.Muon(learning_rate=lr),
    }
    return kinds[cfg.optimizer]()


def _tree_norm(tree) -> mx.array:
    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(tree)))


class Trainer:
    """Runs one training run into the run folder `run`.

    Args:
        model: an mlx-lm model with its trainable part attached (`models.attach_trainable`).
        train, valid: PairSets (valid may be None).
        adapter_cfg: the adapter_config.json content saved with every checkpoint.
        should_stop: polled between steps; True saves a checkpoint and ends the run early.
    """

    def __init__(self, model, objective: Objective, cfg: TrainConfig, train: PairSet, valid: Optional[PairSet],
                 run: Path, adapter_cfg: dict, reporter: Reporter | None = None, pad_id: int = 0,
                 should_stop: Callable[[], bool] = lambda: False):
        self.model, self.objective, self.cfg = model, objective, cfg
        if cfg.grad_checkpoint:
            enable_grad_checkpoint(model)
        self.train_set, self.valid_set = train, valid
        self.run, self.adapter_cfg = Path(run), adapter_cfg
        self.reporter = reporter or Reporter()
        self.pad_id, self.should_stop = pad_id, should_stop
        self.steps = total_steps(cfg, len(train))
        self.optimizer = build_optimizer(cfg, self.steps)
        self.state = TrainState()
        self.watch = LearningWatch()
        self._nonfinite_streak = 0
        self._step_pairs: list[int] = []
        self.initial = {k: mx.array(v) for k, v in trainable_weights(model).items()}
        self._initial_norm = float(_tree_norm(self.initial).item())
        self._lengths = [lay.tokens for lay in train.layouts]
        self._epoch_cache: dict[int, list] = {}

    # -- data order -------------------------------------------------------------------------------------
    def _micro_batch(self, micro: int) -> list[int]:
        """The pair indices of global micro-batch `micro` (a pure function of seed and position)."""
        first = self._batches(0)
        epoch, pos = divmod(micro, len(first))
        return self._batches(epoch)[pos]

    def _batches(self, epoch: int) -> list:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self._lengths, self.cfg.batch_size, self.cfg.seed, epoch)}
        return self._epoch_cache[epoch]

    # -- compiled pieces --------------------------------------------------------------------------------
    def _compile(self):
        objective, model, optimizer = self.objective, self.model, self.optimizer
        loss_and_grad = nn.value_and_grad(model, partial(batch_objective, objective=objective))
        names = self._metric_names()
        grad_state = [model.state, mx.random.state]

        @partial(mx.compile, inputs=grad_state, outputs=grad_state)
        def grad_step(tokens, starts, score_lens, keep_lens, ref):
            (loss, metrics), grads = loss_and_grad(model, tokens, starts, score_lens, keep_lens, ref)
            return loss, mx.stack([metrics[n].mean() for n in names]), grads

        update_state = [model.state, optimizer.state]
        max_norm = self.cfg.max_grad_norm

        @partial(mx.compile, inputs=update_state, outputs=update_state)
        def apply_update(grads, norm):
            if max_norm > 0:
                scale = mx.minimum(1.0, max_norm / (norm + 1e-6))
                grads = tree_map(lambda g: g * scale, grads)
            optimizer.update(model, grads)

        return grad_step, apply_update, names

    def _metric_names(self) -> list[str]:
        names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "num_tokens/chosen", "num_tokens/rejected"]
        if self.objective.needs_full_chosen:
            names.append("sft_nll")
        return names

    # -- one optimizer step -----------------------------------------------------------------------------
    def _step(self, grad_step, apply_update, names):
        """One optimizer step. Returns (values, tokens, scored, pairs, applied); applied is False when the
        batch was non-finite and --skip-nonfinite skipped it (else that raises before any update)."""
        accum = self.cfg.grad_accumulation_steps
        grads, sums, tokens, scored, pairs = None, None, 0, 0, 0
        self._step_pairs = []
        for _ in range(accum):
            idx = self._micro_batch(self.state.micro)
            self._step_pairs += idx
            # Dropout draws from a key fixed by (seed, micro-batch), so a resumed run replays them exactly.
            mx.random.seed(self.cfg.seed * 1_000_003 + self.state.micro)
            b = self.train_set.batch(idx, self.pad_id)
            ref = b.ref_logps if b.ref_logps is not None else np.zeros(len(b.starts), np.float32)
            loss, mvec, g = grad_step(mx.array(b.tokens), mx.array(b.starts), mx.array(b.score_lens),
                                      mx.array(b.keep_lens), mx.array(ref))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            sums = mvec if sums is None else sums + mvec
            tokens, scored, pairs = tokens + b.real_tokens, scored + b.scored_tokens, pairs + len(idx)
            self.state.micro += 1
        if accum > 1:
            grads = tree_map(lambda x: x / accum, grads)
        norm = _tree_norm(grads)
        mx.eval(sums, norm, grads)
        values = dict(zip(names, (sums / accum).tolist()))
        values["grad_norm"] = norm.item()
        if all(math.isfinite(v) for v in values.values()):
            apply_update(grads, norm)
            mx.eval(self.model.state, self.optimizer.state)
            return values, tokens, scored, pairs, True
        if not self.cfg.skip_nonfinite:
            self._non_finite(values)
        return values, tokens, scored, pairs, False

    def _bad_values(self, values: dict) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
        where = [self.train_set.pairs[i].where for i in self._step_pairs[:3]]
        more = " ..." if len(self._step_pairs) > 3 else ""
        return f"{bad}; batch rows: {', '.join(w for w in where if w) or '?'}{more}"

    def _non_finite(self, values: dict) -> None:
        last = latest_checkpoint(self.run)
        raise PoetError(
            f"non-finite values at step {self.state.step + 1} ({self._bad_values(values)}); the update was not "
            "applied and no adapter with NaN/inf was saved. Lower --learning-rate or --beta, check those rows, "
            "or pass --skip-nonfinite to skip such batches"
            + (f"; the last good checkpoint is {last} (resume with: {resume_command(self.run)} --skip-nonfinite)"
               if last else "")
        )

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        if resume:
            self._restore()
        log = MetricsLog(self.run, resume_step=self.state.step if resume else None)
        grad_step, apply_update, names = self._compile()
        self.model.train()
        if self.valid_set is not None and self.state.step == 0 and self.cfg.steps_per_eval > 0:
            self._validate(log)
        window: list[dict] = []
        interrupted = False
        while self.state.step < self.steps:
            if self.should_stop():
                interrupted = True
                break
            tic = time.perf_counter()
            values, tokens, scored, pairs, applied = self._step(grad_step, apply_update, names)
            elapsed = time.perf_counter() - tic
            self._account(values, tokens, scored, pairs, elapsed)
            step = self.state.step
            self.reporter.step(step, self.steps, values)
            if applied:
                window.append(values)
                self._watch(values, log)
            else:
                self._skipped(values, log)
            if window and (step % self.cfg.steps_per_report == 0 or step == self.steps):
                self._write_report(log, window)
                window = []
            if self.valid_set is not None and self.cfg.steps_per_eval and (
                    step % self.cfg.steps_per_eval == 0 or step == self.steps):
                self._validate(log)
            if self.cfg.save_every and step % self.cfg.save_every == 0 and step != self.steps:
                self._checkpoint()
        if window:
            self._write_report(log, window)
        self._checkpoint()
        return self._summary(interrupted)

    def _account(self, values, tokens, scored, pairs, elapsed):
        s = self.state
        s.step += 1
        s.tokens += tokens
        s.scored_tokens += scored
        s.pairs += pairs
        s.train_seconds += elapsed
        values.update({
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "tokens_per_second": tokens / elapsed,
            "pairs_per_second": pairs / elapsed,
            "step_seconds": elapsed,
        })

    # -- is it learning? --------------------------------------------------------------------------------
    def _warn(self, kind: str, message: str, log: MetricsLog) -> None:
        """A warning goes to the dashboard, the metrics log (a record with a "warning" key) and the summary."""
        s = self.state
        if len(s.warnings) < MAX_WARNINGS_KEPT:
            s.warnings.append({"step": s.step, "kind": kind, "message": message})
        log.write({"step": s.step, "warning": message, "kind": kind})
        self.reporter.warning(message)

    def _watch(self, values: dict, log: MetricsLog) -> None:
        self._nonfinite_streak = 0
        for kind, message in self.watch.observe(values["loss"], values["grad_norm"]):
            self._warn(kind, message, log)
        self.state.zero_grad_steps = self.watch.zero_grad_steps

    def _skipped(self, values: dict, log: MetricsLog) -> None:
        """--skip-nonfinite: count the skipped batch; give up when every batch for a while is non-finite."""
        s = self.state
        s.nonfinite_skipped += 1
        self._nonfinite_streak += 1
        self._warn("nonfinite", f"step {s.step}: non-finite values ({self._bad_values(values)}); batch skipped "
                                f"(--skip-nonfinite), {s.nonfinite_skipped} so far", log)
        if self._nonfinite_streak >= self.watch.patience:
            last = latest_checkpoint(self.run)
            raise PoetError(
                f"{self._nonfinite_streak} batches in a row were non-finite (up to step {s.step}): the adapters "
                "are probably damaged; start again with a lower --learning-rate"
                + (f" (the last good checkpoint is {last})" if last else ""))

    def _write_report(self, log: MetricsLog, window: list[dict]) -> None:
        keys = window[-1].keys()
        record = {"step": self.state.step, "epoch": self._epoch()}
        record.update({k: float(np.mean([w[k] for w in window])) for k in keys
                       if k not in ("learning_rate",)})
        record["learning_rate"] = window[-1]["learning_rate"]
        record["adapter_change"] = self._adapter_change()
        record["tokens_seen"] = self.state.tokens
        record["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        record["elapsed_seconds"] = self.state.train_seconds
        if self.state.nonfinite_skipped:
            record["nonfinite_skipped"] = self.state.nonfinite_skipped
        log.write(record)
        self.reporter.log(record)
        applied = self.state.step - self.state.nonfinite_skipped
        if applied >= self.watch.patience:
            for kind, message in self.watch.adapters(applied, record["adapter_change"], self._initial_norm):
                self._warn(kind, message, log)

    def _epoch(self) -> float:
        return round(self.state.micro / max(1, len(self._batches(0))), 4)

    def _adapter_change(self) -> float:
        """L2 norm of (trainable weights - their initial values): zero means the run changed nothing."""
        now = trainable_weights(self.model)
        return float(mx.sqrt(sum(((now[k] - v) ** 2).sum() for k, v in self.initial.items())).item())

    def _validate(self, log: MetricsLog) -> None:
        self.reporter.phase("validation", 0, len(self.valid_set))
        means, _ = evaluate(self.model, self.valid_set, self.objective, self.cfg.batch_size, self.pad_id,
                            progress=lambda d, t: self.reporter.phase("validation", d, t))
        self.model.train()
        record = {"step": self.state.step, **{f"eval_{k}": v for k, v in means.items()}}
        self.state.last_eval = record
        best = self.state.best
        if not best or record["eval_loss"] < best.get("eval_loss", math.inf):
            self.state.best = record
        log.write(record)
        self.reporter.log(record)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _checkpoint(self) -> Path:
        """Save a checkpoint, then the run folder's adapters. NaN/inf weights, a full disk or a read-only
        folder raise PoetError and keep the previous checkpoint and adapters as they were."""
        weights = trainable_weights(self.model)
        self.reporter.phase("saving", 0, 1)
        state = asdict(self.state)
        state["total_steps"] = self.steps
        folder = save_checkpoint(self.run, self.state.step, weights, dict(tree_flatten(self.optimizer.state)),
                                 state)
        try:
            save_adapters(self.run, self.model, self.adapter_cfg)
        except OSError as exc:
            raise write_error(exc, f"the adapters of step {self.state.step} to {self.run}", self.run) from exc
        self.reporter.phase("saving", 1, 1)
        self.reporter.checkpoint(self.state.step, str(folder))
        return folder

    def _restore(self) -> None:
        folder = latest_checkpoint(self.run)
        if folder is None:
            raise PoetError(f"nothing to resume in {self.run}: no complete checkpoint")
        adapters, opt_state, state = load_checkpoint(folder)
        self.model.load_weights(list(adapters.items()), strict=False)
        self.optimizer.init(self.model.trainable_parameters())
        # A checkpoint saved before any update (a stop at step 0, or only skipped batches) has no per-parameter
        # slots yet: the fresh ones are exactly what it would hold.
        never_updated = not any(k in opt_state for k, _ in tree_flatten(self.optimizer.state) if "." in k)
        try:
            self.optimizer.state = tree_map_with_path(
                lambda path, v: opt_state.get(path, v) if never_updated else opt_state[path], self.optimizer.state)
        except KeyError as exc:
            raise PoetError(f"checkpoint {folder} does not match this optimizer/adapter setup (missing {exc}); "
                            "resume with the settings the run started with") from None
        known = {f.name for f in fields(TrainState)}  # a newer or older checkpoint may carry other counters
        self.state = TrainState(**{k: v for k, v in state.items() if k in known})
        self.watch = LearningWatch(warned=[w.get("kind") for w in self.state.warnings])
        self.watch.zero_grad_steps = self.state.zero_grad_steps

    def _summary(self, interrupted: bool) -> dict:
        s = self.state
        return {
            "steps": s.step,
            "total_steps": self.steps,
            "interrupted": interrupted,
            "train_seconds": s.train_seconds,
            "tokens_seen": s.tokens,
            "scored_tokens": s.scored_tokens,
            "pairs_seen": s.pairs,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "last_eval": s.last_eval,
            "best_eval": s.best,
            "adapter_path": str(self.run),
            "adapter_files": [str(self.run / ADAPTER_FILE), str(self.run / ADAPTER_CONFIG)],
            "adapter_change": self._adapter_change(),
            "nonfinite_skipped": s.nonfinite_skipped,
            "warnings": [w["message"] for w in s.warnings],
        }

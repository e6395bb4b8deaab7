"""The training loop: compiled steps, accumulation, clipping, schedule, validation, checkpoints, resume.

The trainer orchestrates; the math lives in `objective`, `losses`, `logprobs` and `poet`. It talks to the
outside only through a `Reporter` and the run folder, and stops between steps when `should_stop()` says so
(the CLI wires that to SIGINT/SIGTERM), saving a checkpoint first.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE, enable_grad_checkpoint, save_adapters, trainable_weights
from ..backends.parallel_rows import engaged
from ..batching import PairSet, batches_per_epoch, epoch_batches
from ..config import LossConfig, TrainConfig
from ..errors import PoetError
from ..head import head_is_frozen, output_head
from ..objective import batch_inputs, batch_objective, feeds_halves, metric_names
from ..reporting import Reporter
from .checkpoint import MetricsLog, latest_checkpoint, load_checkpoint, resume_command, save_checkpoint, write_error
from .distributed import World, all_sum, broadcast_json, broadcast_tree, shard, weighted_average_tree
from .evaluation import evaluate
from .health import LearningWatch
from .memory import peak_memory_warning
from .optimization import build_optimizer, total_steps, tree_norm

MAX_WARNINGS_KEPT = 20


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


class Trainer:
    """Runs one training run into the run folder `run`.

    Args:
        model: an mlx-lm model with its trainable part attached (`models.attach_trainable`).
        train, valid: PairSets (valid may be None).
        adapter_cfg: the adapter_config.json content saved with every checkpoint.
        should_stop: polled between steps; True saves a checkpoint and ends the run early.
        world: this process's place in a data-parallel job (`distributed.init_world()`); each rank computes
            its shard of every batch, gradients are averaged, and only rank 0 writes files.
    """

    def __init__(self, model, objective: LossConfig, cfg: TrainConfig, train: PairSet, valid: Optional[PairSet],
                 run: Path, adapter_cfg: dict, reporter: Reporter | None = None, pad_id: int = 0,
                 should_stop: Callable[[], bool] = lambda: False, world: World | None = None):
        self.model, self.objective, self.cfg = model, objective, cfg
        self.world = world or World()
        if cfg.grad_checkpoint:
            enable_grad_checkpoint(model)
        self.head, self.halves, self.frozen_head = output_head(model), feeds_halves(model), head_is_frozen(model)
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
        self._initial_norm = float(tree_norm(self.initial).item())
        self._lengths = [lay.tokens for lay in train.layouts]
        self._per_epoch = batches_per_epoch(len(train), cfg.batch_size)
        self._epoch_cache: dict[int, list] = {}

    # -- data order -------------------------------------------------------------------------------------
    def _micro_batch(self, micro: int) -> list[int]:
        """The pair indices of global micro-batch `micro` (a pure function of seed and position)."""
        epoch, pos = divmod(micro, self._per_epoch)
        return self._batches(epoch)[pos]

    def _batches(self, epoch: int) -> list:
        """Epoch `epoch`'s batches; only the current epoch's order is kept (computed once per epoch)."""
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self._lengths, self.cfg.batch_size, self.cfg.seed, epoch)}
        return self._epoch_cache[epoch]

    # -- compiled pieces --------------------------------------------------------------------------------
    def _compile(self):
        objective, model, optimizer = self.objective, self.model, self.optimizer
        step_objective = partial(batch_objective, objective=objective, head=self.head, frozen_head=self.frozen_head)
        loss_and_grad = nn.value_and_grad(model, step_objective)
        names = metric_names(self.objective)
        grad_state = [model.state, mx.random.state]

        @partial(mx.compile, inputs=grad_state, outputs=grad_state)
        def grad_step(*inputs):  # the arrays of `objective.batch_inputs`
            (loss, metrics), grads = loss_and_grad(model, *inputs)
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
            local, weight = self._local_share(idx)
            with engaged(self.model, self.halves):  # OpenBLAS threads per stream, where split
                loss, mvec, g = grad_step(*batch_inputs(self.train_set.batch(local, self.pad_id), self.halves))
                mx.eval(loss, mvec, g)  # alone: with the norm in the same graph, a higher peak (backends/runahead.py)
            g, mvec = weighted_average_tree((g, mvec), weight, self.world)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            sums = mvec if sums is None else sums + mvec
            # Counted from the layouts of the whole micro-batch, which every rank knows: no communication.
            lays = [self.train_set.layouts[i] for i in idx]
            tokens += sum(lay.tokens for lay in lays)
            scored += sum(lay.score_chosen + lay.score_rejected for lay in lays)
            pairs += len(idx)
            self.state.micro += 1
        if accum > 1:
            grads = tree_map(lambda x: x / accum, grads)
        norm = tree_norm(grads)
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

    def _local_share(self, idx: list[int]) -> tuple[list[int], float]:
        """This rank's pairs of a global micro-batch and their share of it (the weight of its gradient). A rank
        left without pairs (a last batch smaller than the world) still runs one pair, with weight 0, so every
        rank takes part in the same all-reduces."""
        if not self.world.distributed:
            return idx, 1.0
        local = shard(idx, self.world)
        return (local, len(local) / len(idx)) if local else (idx[:1], 0.0)

    def _stop_requested(self) -> bool:
        """Any rank's stop request stops every rank at the same step (else the others would hang)."""
        wanted = bool(self.should_stop())
        if self.world.distributed:
            wanted = all_sum(mx.array([int(wanted)], mx.int32), self.world).item() > 0
        return wanted

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
        log = (MetricsLog(self.run, resume_step=self.state.step if resume else None) if self.world.is_main
               else _SilentLog())
        grad_step, apply_update, names = self._compile()
        self.model.train()
        if self.valid_set is not None and self.state.step == 0 and self.cfg.steps_per_eval > 0:
            self._validate(log)
        window: list[dict] = []
        interrupted = False
        while self.state.step < self.steps:
            if self._stop_requested():
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
        self._check_peak_memory(log)
        applied = self.state.step - self.state.nonfinite_skipped
        if applied >= self.watch.patience:
            for kind, message in self.watch.adapters(applied, record["adapter_change"], self._initial_norm):
                self._warn(kind, message, log)

    def _check_peak_memory(self, log: MetricsLog) -> None:
        """Warn once when the measured peak nears the machine's memory (every reporter and the log see it)."""
        warned = any(w["kind"] == "memory" for w in self.state.warnings)  # then no need to measure again
        if not warned and (message := peak_memory_warning(mx.get_peak_memory())):
            self._warn("memory", message, log)

    def _epoch(self) -> float:
        return round(self.state.micro / self._per_epoch, 4)

    def _adapter_change(self) -> float:
        """L2 norm of (trainable weights - their initial values): zero means the run changed nothing."""
        now = trainable_weights(self.model)
        return float(mx.sqrt(sum(((now[k] - v) ** 2).sum() for k, v in self.initial.items())).item())

    def _validate(self, log: MetricsLog) -> None:
        self.reporter.phase("validation", 0, len(self.valid_set))
        means, _ = evaluate(self.model, self.valid_set, self.objective, self.cfg.batch_size, self.pad_id,
                            progress=lambda d, t: self.reporter.phase("validation", d, t), world=self.world)
        self.model.train()
        record = {"step": self.state.step, **{f"eval_{k}": v for k, v in means.items()}}
        self.state.last_eval = record
        best = self.state.best
        if not best or record["eval_loss"] < best.get("eval_loss", math.inf):
            self.state.best = record
        log.write(record)
        self.reporter.log(record)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _checkpoint(self) -> Optional[Path]:
        """Save a checkpoint, then the run folder's adapters. NaN/inf weights, a full disk or a read-only
        folder raise PoetError and keep the previous checkpoint and adapters as they were.

        Only rank 0 writes: every rank holds the same weights."""
        if not self.world.is_main:
            return None
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
        """Load the latest checkpoint. In a distributed run rank 0 reads it and sends it to the others, whose
        machines need not hold the run folder."""
        if self.world.is_main:
            folder = latest_checkpoint(self.run)
            if folder is None:
                raise PoetError(f"nothing to resume in {self.run}: no complete checkpoint")
            adapters, opt_state, state = load_checkpoint(folder)
        else:
            folder, state = self.run, {}
            adapters = {k: mx.zeros_like(v) for k, v in trainable_weights(self.model).items()}
        if self.world.distributed:
            adapters, opt_state, state = self._broadcast_checkpoint(adapters, opt_state if self.world.is_main
                                                                     else None, state)
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

    def _broadcast_checkpoint(self, adapters: dict, opt_state: Optional[dict], state: dict):
        """Rank 0's checkpoint on every rank: the trees have the same shapes everywhere (same model and
        optimizer), so the others contribute zeros to an all-reduce."""
        state = broadcast_json(state, self.world)
        keys = broadcast_json(sorted(opt_state) if opt_state is not None else None, self.world)
        if opt_state is None:
            self.optimizer.init(self.model.trainable_parameters())
            shapes = dict(tree_flatten(self.optimizer.state))
            opt_state = {k: mx.zeros_like(shapes[k]) if k in shapes else mx.zeros((1,)) for k in keys}
        return broadcast_tree(adapters, self.world), broadcast_tree(opt_state, self.world), state

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


class _SilentLog:
    """The metrics log of ranks other than 0: rank 0 writes the run's only metrics.jsonl."""

    def write(self, record: dict) -> None:
        pass

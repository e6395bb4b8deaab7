"""Is the run learning? Bookkeeping that turns per-step numbers into "nothing is learning" warnings.

Pure Python: no MLX, no I/O; the trainer feeds it and routes what it returns to the reporter and the log.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

LEARNING_PATIENCE = 10
"""Steps of evidence before the run warns that nothing is learning (zero gradients, still adapters, flat loss),
and consecutive non-finite batches before --skip-nonfinite gives up."""
LOSS_FLAT_TOL = 1e-5
"""Per-step losses that stay within this band for LEARNING_PATIENCE steps count as flat. Float32 rounding
between the reference pass and the policy moves DPO's initial loss by ~3e-6 (measured on the tiny model),
so the band sits above that and far below any change that training makes."""
ADAPTER_STILL_REL = 1e-7
"""Adapter change below this fraction of the initial trainable norm is no change (float32 resolution)."""

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

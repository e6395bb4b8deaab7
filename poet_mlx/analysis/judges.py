"""Judges of generated replies (`--judge SPEC`): `load_judge` turns a spec into an object with `.name` and
`.score(samples, tokenizer) -> list[float]` (higher = better).

- `module:function` or `path/to/file.py:function`: any Python callable `function(prompt, reply) -> float`,
  e.g. `poet_mlx.demo.task:judge`. `prompt` is the row's prompt text (for a conversational row, the content
  of its last prompt message); `reply` is the generated text.
- `implicit:RUN`: the implicit reward of a trained run, as its loss's registry entry measures it (the DPO
  family: beta * (log pi - log ref) of the reply; CPO/SFT: beta * log pi; SimPO/ORPO: beta * its average
  log-prob), scored on the same token ids that were sampled.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import PoetError
from .generations import Sample

JUDGE_HELP = ("--judge takes module:function (a Python callable f(prompt, reply) -> float, e.g. "
              "poet_mlx.demo.task:judge), path/to/file.py:function, or implicit:RUN (a trained run's implicit "
              "reward)")


class CallableJudge:
    """A user callable f(prompt, reply) -> float, with its return values checked."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def score(self, samples: Sequence[Sample], tokenizer=None) -> list[float]:
        return [check_score(self.fn(s.prompt, s.reply), self.name, s) for s in samples]


def check_score(value, judge: str, sample: Sample) -> float:
    """A judge's return value as a float; PoetError when it is not a finite real number."""
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise PoetError(f"judge {judge} returned {value!r} ({type(value).__name__}) for prompt #{sample.index} "
                        f"({sample.model}); a judge must return a finite number, higher = better")
    return float(value)


_NOT_A_SCORE = {str, bytes, list, dict, tuple, set, type(None), None, "str", "bytes", "list", "dict", "tuple",
                "set", "None"}


def load_callable(spec: str) -> Callable:
    """Import `module:function` (or `path/to/file.py:function`) and check it can be called as f(prompt, reply).

    Raises:
        PoetError: the spec is malformed, the module cannot be imported, the function is missing or not
            callable, its signature does not accept (prompt, reply), or it is annotated to return a non-number.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise PoetError(f"--judge {spec!r} is not module:function. {JUDGE_HELP}")
    module = _import(module_name, spec)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise PoetError(f"--judge {spec}: module '{module_name}' has no '{attr}'"
                            + (f" (its callables: {', '.join(public[:12])})" if public else ""))
        fn = getattr(fn, part)
    if not callable(fn):
        raise PoetError(f"--judge {spec}: '{attr}' is a {type(fn).__name__}, not a function; point at a callable "
                        "f(prompt, reply) -> float")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # some builtins have no signature: trust them, the scores are checked on every call
    try:
        sig.bind("prompt", "reply")
    except TypeError:
        raise PoetError(f"--judge {spec}: '{attr}{sig}' cannot be called as {attr}(prompt, reply); a judge takes "
                        "exactly the prompt and the reply, as two positional arguments") from None
    if sig.return_annotation is not inspect.Signature.empty and sig.return_annotation in _NOT_A_SCORE:
        raise PoetError(f"--judge {spec}: '{attr}' is annotated to return {sig.return_annotation!r}; a judge "
                        "returns a number (float), higher = better")
    return fn


def _import(module_name: str, spec: str):
    path = Path(module_name)
    if module_name.endswith(".py"):
        if not path.is_file():
            raise PoetError(f"--judge {spec}: file {path} not found")
        name = f"poet_mlx_judge_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        try:
            sys.modules[name] = module
            loader.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise PoetError(f"--judge {spec}: importing {path} failed ({type(exc).__name__}: {exc})") from None
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        fn = spec.rpartition(":")[2]
        raise PoetError(f"--judge {spec}: no module named '{exc.name or module_name}'. Install it, run from the "
                        f"folder that holds it (or set PYTHONPATH), or give a file: path/to/judges.py:{fn}") from None
    except Exception as exc:
        raise PoetError(f"--judge {spec}: importing '{module_name}' failed ({type(exc).__name__}: {exc})") from None


class ImplicitJudge:
    """The implicit reward of a trained run, on the sampled token ids (the eval and the run must share a
    tokenizer). The run's base model and adapters load on first use; the reference is the run's own: its
    --ref-model when it was trained with one, else its base (adapters off)."""

    def __init__(self, run: str, batch_size: int = 8):
        from ..config import RunConfig
        from ..train.checkpoint import saved_config

        self.run, self.name = Path(run), f"implicit:{run}"
        self.cfg = RunConfig.from_flat(saved_config(self.run), source=f"{self.run}/adapter_config.json")
        self.batch_size = batch_size
        self.model = None

    def _load(self, tokenizer):
        from ..adapters import load_adapters
        from ..models import load_model

        model, tok, _ = load_model(self.cfg.model.model, self.cfg.model.revision, self.cfg.model.trust_remote_code)
        if tok.get_vocab() != tokenizer.get_vocab():
            raise PoetError(f"judge {self.name}: the run's model {self.cfg.model.model} has another tokenizer than "
                            "the evaluated model; an implicit judge must share the tokenizer")
        load_adapters(model, self.run)
        model.eval()
        self.model = model

    def score(self, samples: Sequence[Sample], tokenizer=None) -> list[float]:
        """Rewards of the samples, whose token ids come from `tokenizer` (the evaluated model's)."""
        from ..adapters import adapters_disabled
        from ..scoring import score_sequences

        if tokenizer is None:
            raise ValueError("an implicit judge scores token ids: pass the tokenizer they come from")
        if self.model is None:
            self._load(tokenizer)
        eos = tokenizer.eos_token_id
        replies = [list(s.reply_ids) + ([eos] if s.finished and eos is not None else []) for s in samples]
        # An empty reply still gets one scored token (the EOS it would need), so every score is defined.
        replies = [r if r else [eos or 0] for r in replies]
        sequences = [(np.asarray(s.prompt_ids, np.int32), np.asarray(r, np.int32)) for s, r in zip(samples, replies)]
        kind, beta = self.cfg.loss.reward, self.cfg.loss.resolved_beta
        policy, _ = score_sequences(self.model, sequences, self.batch_size)
        if kind == "log_ratio":
            reference = self._reference_logps(sequences, adapters_disabled, score_sequences)
            sums = [float(p.sum() - r.sum()) for p, r in zip(policy, reference)]
        else:
            sums = [float(p.sum()) for p in policy]
        if kind == "mean_logps":
            sums = [s / len(r) for s, r in zip(sums, replies)]
        return [beta * s for s in sums]


    def _reference_logps(self, sequences, adapters_disabled, score_sequences) -> list:
        ref = self.cfg.model.ref_model
        if not ref:
            with adapters_disabled(self.model):
                return score_sequences(self.model, sequences, self.batch_size)[0]
        from ..models import load_model

        model, _, _ = load_model(ref, trust_remote_code=self.cfg.model.trust_remote_code)
        return score_sequences(model, sequences, self.batch_size)[0]


def load_judge(spec: str):
    """A judge object with `.name` and `.score(samples, tokenizer) -> list[float]` from a --judge spec (see
    the module docstring). Cheap: an implicit judge checks its run folder now and loads its model on first use.
    """
    if spec.startswith("implicit:"):
        run = spec[len("implicit:"):]
        if not run:
            raise PoetError(f"--judge implicit: needs a run folder, e.g. implicit:runs/dpo. {JUDGE_HELP}")
        return ImplicitJudge(run)
    return CallableJudge(load_callable(spec), spec)

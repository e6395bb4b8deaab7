"""The generation-level check: sample replies from the base and the aligned model, judge them, count wins.

Implicit rewards say how the model *ranks* given replies; what users see is what it *generates*. For each
held-out prompt, the base (adapters off) and the aligned model each sample one reply, with the same seed per
prompt (so two identical models give identical replies: ties, win rate 0.5). A judge scores every reply; the
aligned model wins a prompt when its reply scores higher, ties when equal.

Judges (`load_judge`):
- `module:function` or `path/to/file.py:function`: any Python callable `function(prompt, reply) -> float`
  (higher is better), e.g. `poet_mlx.demo.task:judge`. `prompt` is the row's prompt text (for a
  conversational row, the content of its last prompt message); `reply` is the generated text.
- `implicit:RUN`: the implicit reward of a trained run (DPO family: beta * (log pi - log ref) of the reply;
  SimPO: beta * its average log-prob), scored on the same token ids that were sampled.

Win rate: (wins + ties / 2) / n. Its confidence interval is Wilson's score interval for that proportion at n
prompts. With ties a prompt's outcome is 0, 1/2 or 1, whose variance is at most that of a 0/1 outcome with the
same mean, so the interval is conservative (slightly too wide) when there are ties, exact in coverage terms
otherwise (as Wilson is for a binomial).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import numbers
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import PoetError

JUDGE_HELP = ("--judge takes module:function (a Python callable f(prompt, reply) -> float, e.g. "
              "poet_mlx.demo.task:judge), path/to/file.py:function, or implicit:RUN (a trained run's implicit "
              "reward)")


@dataclass
class GenerationOptions:
    """What `poet-mlx eval --generate N` samples and how (command options, not training settings)."""

    prompts: int
    judge: str
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Sample:
    """One generated reply, with what the judge and the JSONL need."""

    index: int
    prompt: str
    model: str
    reply: str
    reply_ids: list
    finished: bool
    seed: int
    prompt_ids: np.ndarray = field(repr=False, default=None)
    score: Optional[float] = None

    def to_json(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "model": self.model, "reply": self.reply,
                "tokens": len(self.reply_ids), "finished": self.finished, "seed": self.seed, "score": self.score}


# ------------------------------------------------------------------------------------------------ sampling


def prompt_text(row) -> str:
    """The text a judge sees as the prompt: the row's prompt string, or a conversation's last message."""
    if isinstance(row.prompt, str):
        return row.prompt
    return str(row.prompt[-1].get("content", "")) if row.prompt else ""


def sample_replies(model, tokenizer, prompts: Sequence[np.ndarray], max_tokens: int, temperature: float,
                   seed: int, top_p: float = 1.0,
                   progress: Optional[Callable[[int, int], None]] = None) -> list[tuple[str, list, bool]]:
    """Sample one reply per prompt with mlx-lm's `stream_generate`.

    Args:
        prompts: token ids of each prompt, as training sees them (chat template included).
        temperature: 0 is greedy; top_p < 1 adds nucleus sampling.
        seed: prompt i is sampled after `mx.random.seed(seed + i)`, so its reply does not depend on the
            other prompts and two equal models give equal replies.

    Returns:
        Per prompt (text, token ids without the EOS, finished): finished is True when the reply ended with
        an EOS token, False when it was cut at `max_tokens`.
    """
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    model.eval()
    out = []
    for i, ids in enumerate(prompts):
        mx.random.seed(seed + i)
        tokens, finished = [], False
        for r in stream_generate(model, tokenizer, mx.array(np.asarray(ids, np.int32)), max_tokens=max_tokens,
                                 sampler=sampler):
            if r.finish_reason == "stop" and r.token in eos:
                finished = True
            elif r.token is not None:
                tokens.append(int(r.token))
        # Decode the ids rather than joining streamed segments: the same text the judge and the JSONL get.
        out.append((tokenizer.decode(tokens), tokens, finished))
        if progress:
            progress(i + 1, len(prompts))
    return out


def generation_prompts(rows, pairs, n: int) -> list[tuple[int, str, np.ndarray]]:
    """(row index, prompt text, prompt token ids) of the first `n` tokenized pairs, in input order.

    Args:
        rows: the split's `PreferenceRow`s (for the prompt text); pairs: its `TokenizedPair`s (for the ids).
    """
    by_index = {r.index: r for r in rows}
    return [(p.index, prompt_text(by_index[p.index]), p.prompt) for p in list(pairs)[:n]]


def generate_samples(model, tokenizer, prompts, label: str, opts: GenerationOptions,
                     progress: Optional[Callable[[int, int], None]] = None) -> list[Sample]:
    """One `Sample` per prompt of `generation_prompts`, from `model` as it is (adapters on or off)."""
    replies = sample_replies(model, tokenizer, [ids for _, _, ids in prompts], opts.max_tokens, opts.temperature,
                             opts.seed, opts.top_p, progress)
    return [Sample(index, text, label, reply, ids, finished, opts.seed + i, prompt_ids)
            for i, ((index, text, prompt_ids), (reply, ids, finished)) in enumerate(zip(prompts, replies))]


# ------------------------------------------------------------------------------------------------- judges


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
    tokenizer). The run's base model and adapters load on first use."""

    def __init__(self, run: str, batch_size: int = 8):
        from ..config import RunConfig
        from ..train.run import saved_config

        self.run, self.name = Path(run), f"implicit:{run}"
        self.cfg = RunConfig.from_flat(saved_config(self.run), source=f"{self.run}/adapter_config.json")
        self.batch_size = batch_size
        self.model = None

    def _load(self, tokenizer):
        from ..models import load_adapters, load_model

        model, tok, _ = load_model(self.cfg.model.model, self.cfg.model.revision, self.cfg.model.trust_remote_code)
        if tok.get_vocab() != tokenizer.get_vocab():
            raise PoetError(f"judge {self.name}: the run's model {self.cfg.model.model} has another tokenizer than "
                            "the evaluated model; an implicit judge must share the tokenizer")
        load_adapters(model, self.run)
        model.eval()
        self.model = model

    def score(self, samples: Sequence[Sample], tokenizer=None) -> list[float]:
        """Rewards of the samples, whose token ids come from `tokenizer` (the evaluated model's)."""
        from ..models import adapters_disabled
        from .prefix import AVERAGED_LOSSES

        if tokenizer is None:
            raise ValueError("an implicit judge scores token ids: pass the tokenizer they come from")
        if self.model is None:
            self._load(tokenizer)
        eos = tokenizer.eos_token_id
        replies = [list(s.reply_ids) + ([eos] if s.finished and eos is not None else []) for s in samples]
        # An empty reply still gets one scored token (the EOS it would need), so every score is defined.
        replies = [r if r else [eos or 0] for r in replies]
        prompts = [s.prompt_ids for s in samples]
        loss, beta = self.cfg.loss.loss, self.cfg.loss.resolved_beta
        policy = reply_logps(self.model, prompts, replies, self.batch_size)
        if loss != "simpo":
            with adapters_disabled(self.model):
                reference = reply_logps(self.model, prompts, replies, self.batch_size)
            sums = [float(p.sum() - r.sum()) for p, r in zip(policy, reference)]
        else:
            sums = [float(p.sum()) for p in policy]
        if loss in AVERAGED_LOSSES:
            sums = [s / len(r) for s, r in zip(sums, replies)]
        return [beta * s for s in sums]


def reply_logps(model, prompts: Sequence[np.ndarray], replies: Sequence[list], batch_size: int,
                pad_id: int = 0) -> list[np.ndarray]:
    """Per-token log-probs of each reply given its prompt (one 1-D float32 array per reply)."""
    from ..data.tokenization import TokenizedPair
    from .entropy import response_token_stats

    # response_token_stats scores pairs; the reply stands on both sides (exact, at twice the compute).
    pairs = [TokenizedPair(np.asarray(p, np.int32), np.asarray(r, np.int32), np.asarray(r, np.int32), i)
             for i, (p, r) in enumerate(zip(prompts, replies))]
    logps, _ = response_token_stats(model, pairs, batch_size, pad_id, entropy=False)
    return [c for c, _ in logps]


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


# -------------------------------------------------------------------------------------------------- stats


@dataclass
class WinRate:
    """Aligned vs base over n prompts: (wins + ties / 2) / n with a Wilson interval at `confidence`."""

    wins: int
    ties: int
    losses: int
    n: int
    rate: float
    low: float
    high: float
    confidence: float = 0.95

    def to_json(self) -> dict:
        return asdict(self)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (successes may be fractional: ties as halves).

    With z the two-sided normal quantile, p = successes / n:
        center = (p + z^2 / 2n) / (1 + z^2 / n),  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    Returns (nan, nan) for n = 0.
    """
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(aligned: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> WinRate:
    """Win rate of aligned over base, prompt by prompt (scores of the same prompts in the same order)."""
    if len(aligned) != len(base):
        raise ValueError(f"{len(aligned)} aligned scores vs {len(base)} base scores")
    a, b = np.asarray(aligned, np.float64), np.asarray(base, np.float64)
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = len(a)
    losses = n - wins - ties
    rate = (wins + ties / 2) / n if n else math.nan
    low, high = wilson_interval(wins + ties / 2, n, confidence)
    return WinRate(wins, ties, losses, n, rate, low, high, confidence)


def samples_jsonl(samples: Sequence[Sample]) -> str:
    """One JSON object per sample (index, prompt, model, reply, tokens, finished, seed, score)."""
    return "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in samples)

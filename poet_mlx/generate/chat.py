"""Talk to a model and its adapters through mlx-lm: chat history, commands, streamed replies. Never prints.

`ChatSession` keeps one conversation per variant ("aligned" = with the adapters, "base" = adapters off through
`models.adapters_disabled`); with `compare` both answer every prompt, each continuing its own conversation, so
the user sees what alignment changed. A reply is a `ReplyStream`: iterate it for text pieces as they are
generated; it adds itself to the history when it ends, is closed, or is interrupted (Ctrl-C keeps the part
already generated, marked "interrupted"). The CLI draws; tests drive the same object with scripted turns.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..errors import PoetError

HELP = (
    ("/help", "this list"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/system TEXT", "set the system prompt (/system alone shows it)"),
    ("/save FILE", "write the transcript as JSON"),
    ("/exit", "leave (or Ctrl-D); Ctrl-C stops a reply but keeps the session"),
)


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn. temperature 0 is greedy; top_p 1 keeps the whole distribution."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: Optional[int] = None

    def check(self) -> None:
        if not self.temperature >= 0:
            raise PoetError(f"--temperature must be >= 0 (got {self.temperature}); 0 means greedy")
        if not 0 < self.top_p <= 1:
            raise PoetError(f"--top-p must be in (0, 1] (got {self.top_p}); 1 disables nucleus sampling")
        if self.max_tokens < 1:
            raise PoetError(f"--max-tokens must be >= 1 (got {self.max_tokens})")

    def sampler(self):
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.temperature, top_p=self.top_p)


@dataclass
class Reply:
    """One generated reply and its numbers; `finish_reason` is "stop", "length" or "interrupted"."""

    variant: str
    text: str = ""
    tokens: int = 0
    tokens_per_second: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens reused from the conversation's cache (not computed again this turn)."""
    finish_reason: Optional[str] = None
    token_ids: list = field(default_factory=list, repr=False)
    prompt_ids: list = field(default_factory=list, repr=False)
    """The whole prompt of this turn (`prompt_tokens` of them were computed, the rest came from the cache)."""


@dataclass
class CommandResult:
    """What a /command did: a message for the user, whether it failed, whether to leave."""

    text: str
    error: bool = False
    exit: bool = False
    help: bool = False


def encode_messages(tokenizer, messages: list[dict], template_kwargs: Optional[dict] = None) -> list[int]:
    """Token ids of `messages` plus the assistant's generation prompt, through the model's chat template
    (with `template_kwargs`, e.g. {"enable_thinking": False}, as mlx-lm's --chat-template-config).

    A tokenizer without a template gets a plain "role: content" transcript (base models have none).
    """
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "has_chat_template", False):
        return list(tokenizer.apply_chat_template(clean, add_generation_prompt=True, **(template_kwargs or {})))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
    return list(tokenizer.encode(text))


def generate_stream(model, tokenizer, prompt_ids: list[int], sampling: Sampling, reply: Reply,
                    prompt_cache=None) -> Iterator[str]:
    """Stream one reply with mlx-lm, updating `reply` as tokens arrive; yields the new text pieces.

    With `prompt_cache` (mlx-lm's KV cache, holding the tokens before `prompt_ids`), only `prompt_ids` are
    computed; the cache then also holds them and the reply's tokens."""
    from mlx_lm import stream_generate

    reply.prompt_tokens = len(prompt_ids)
    for r in stream_generate(model, tokenizer, prompt_ids, max_tokens=sampling.max_tokens,
                             sampler=sampling.sampler(), prompt_cache=prompt_cache):
        if r.token is not None:
            reply.token_ids.append(int(r.token))
        reply.text += r.text
        reply.tokens = r.generation_tokens
        reply.tokens_per_second = r.generation_tps
        if r.finish_reason:
            reply.finish_reason = r.finish_reason
        if r.text:
            yield r.text


class ReplyStream:
    """An iterable reply: text pieces while it is generated; `.reply` has the text and numbers so far.

    `close()` stops it early (the part generated so far is kept, marked "interrupted"). Either way, the
    session's history gets the turn exactly once, when the stream ends.
    """

    def __init__(self, session: "ChatSession", variant: str, user_text: str):
        self.reply = Reply(variant)
        self._session, self._user = session, user_text
        self._gen = self._run()
        self.started = False

    def __iter__(self):
        self.started = True
        return self._gen

    def close(self) -> None:
        self._gen.close()

    def _run(self):
        s, reply = self._session, self.reply
        try:
            ids = encode_messages(s.tokenizer, s.messages(reply.variant) + [{"role": "user", "content": self._user}],
                                  s.template_kwargs)
            if s.sampling.seed is not None:
                import mlx.core as mx

                # Same seed per turn for both variants: in --compare the replies differ by the model, not by luck.
                mx.random.seed(s.sampling.seed + s.turns)
            off = reply.variant == "base" and s.has_adapters
            reply.prompt_ids = list(ids)
            cache, fed = s.caches[reply.variant].reuse(s.model, ids)
            reply.cached_tokens = len(ids) - len(fed)
            with _adapters_off(s.model) if off else nullcontext():
                yield from generate_stream(s.model, s.tokenizer, fed, s.sampling, reply, cache)
        finally:
            if "ids" in locals():
                s.caches[reply.variant].holds(ids + reply.token_ids)
            if reply.finish_reason is None:
                reply.finish_reason = "interrupted"
            s._commit(self._user, reply)


class TurnCache:
    """One conversation's KV cache across turns, so a turn computes only what is new (mlx-lm's prompt cache).

    The cache holds the tokens of the conversation so far (prompt and reply); the next turn's prompt, rendered
    again by the chat template, shares a prefix with them (the template may render a reply's tokens slightly
    differently): the cache is cut back to that prefix and only the rest is computed.
    """

    def __init__(self):
        self.cache, self.ids = None, []

    def reuse(self, model, ids: list[int]) -> tuple[object, list[int]]:
        """(cache to pass to generation, the tokens of `ids` it does not hold yet; never empty)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        if self.cache is None or not can_trim_prompt_cache(self.cache):
            self.cache, self.ids = make_prompt_cache(model), []
        held = min(len(self.ids), _offset(self.cache))
        common = 0
        while common < min(held, len(ids) - 1) and self.ids[common] == ids[common]:
            common += 1
        trim_prompt_cache(self.cache, _offset(self.cache) - common)
        return self.cache, ids[common:]

    def holds(self, ids: list[int]) -> None:
        """Record the tokens the cache now holds (the prompt and the reply generated into it)."""
        self.ids = list(ids)

    def clear(self) -> None:
        self.cache, self.ids = None, []


def _offset(cache) -> int:
    return int(getattr(cache[0], "offset", 0)) if cache else 0


def _adapters_off(model):
    from ..adapters import adapters_disabled

    return adapters_disabled(model)


class ChatSession:
    """A multi-turn chat with one model; with `compare`, the base (adapters off) and the aligned model."""

    def __init__(self, model, tokenizer, *, has_adapters: bool, compare: bool = False,
                 system: Optional[str] = None, sampling: Sampling = Sampling(), info: Optional[dict] = None,
                 template_kwargs: Optional[dict] = None):
        if compare and not has_adapters:
            raise PoetError("--compare needs LoRA/DoRA adapters to switch off: pass --adapter-path RUN")
        sampling.check()
        self.model, self.tokenizer = model, tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self.has_adapters, self.compare = has_adapters, compare
        self.system = system or None
        self.sampling = sampling
        self.info = dict(info or {})
        self.variants = ("base", "aligned") if compare else (("aligned",) if has_adapters else ("base",))
        self.histories: dict[str, list[dict]] = {v: [] for v in self.variants}
        self.caches = {v: TurnCache() for v in self.variants}
        self.turns = 0

    def messages(self, variant: str) -> list[dict]:
        """The conversation `variant` has had: the system prompt, then user/assistant turns."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.histories[variant]

    def ask(self, user_text: str) -> list[ReplyStream]:
        """One stream per variant (base first under compare). Consume them in order; close the rest on Ctrl-C."""
        self.turns += 1
        return [ReplyStream(self, v, user_text) for v in self.variants]

    def _commit(self, user_text: str, reply: Reply) -> None:
        numbers = {k: v for k, v in asdict(reply).items() if k not in ("variant", "text", "token_ids", "prompt_ids")}
        self.histories[reply.variant] += [{"role": "user", "content": user_text},
                                          {"role": "assistant", "content": reply.text, **numbers}]

    # -- commands ---------------------------------------------------------------------------------------------
    def command(self, line: str) -> Optional[CommandResult]:
        """Run a /command; None when `line` is a message for the model."""
        if not line.startswith("/"):
            return None
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return CommandResult("bye", exit=True)
        if name == "/help":
            return CommandResult("\n".join(f"{c:<14} {d}" for c, d in HELP), help=True)
        if name == "/reset":
            self.histories = {v: [] for v in self.variants}
            self.caches = {v: TurnCache() for v in self.variants}
            return CommandResult("conversation cleared" + (" (system prompt kept)" if self.system else ""))
        if name == "/system":
            if not arg:
                return CommandResult(f"system prompt: {self.system}" if self.system else "no system prompt")
            self.system = arg
            return CommandResult("system prompt set; it applies to the whole conversation from the next reply")
        if name == "/save":
            if not arg:
                return CommandResult("/save needs a file name, e.g. /save chat.json", error=True)
            try:
                path = self.save(arg)
            except OSError as exc:
                return CommandResult(f"could not save to {arg}: {exc.strerror or exc}", error=True)
            return CommandResult(f"saved the transcript to {path}")
        return CommandResult(f"unknown command {name}; /help lists the commands", error=True)

    def transcript(self) -> dict:
        """JSON-ready record: settings, then `messages` (the aligned or only conversation) and, under
        compare, `base_messages`. Assistant messages carry tokens, tokens_per_second and finish_reason."""
        out = {**self.info, "compare": self.compare, "system": self.system, "sampling": asdict(self.sampling)}
        main = "aligned" if self.has_adapters else "base"
        out["messages"] = self.messages(main)
        if self.compare:
            out["base_messages"] = self.messages("base")
        return out

    def save(self, path: str | Path) -> Path:
        from ..fsutil import write_json_atomic

        path = Path(path).expanduser()
        write_json_atomic(path, self.transcript())
        return path


# -- loading and batch generation ---------------------------------------------------------------------------------
@dataclass
class LoadedChat:
    """A model ready to talk: with its adapters applied when an adapter path was given."""

    model: object
    tokenizer: object
    model_ref: str
    adapter_path: Optional[str]
    fine_tune_type: Optional[str] = None
    notes: list = field(default_factory=list)


def load_for_chat(model: Optional[str], adapter_path: Optional[str], trust_remote_code: bool = False,
                  template_kwargs: Optional[dict] = None) -> LoadedChat:
    """Load `model` (default: the run's base model) and apply the run's adapters; `notes` say what the user
    should know (no chat template; a turn-end token generation does not stop at)."""
    from ..adapters import load_adapters
    from ..export.model_card import read_run
    from ..models import load_model

    run = read_run(adapter_path) if adapter_path else None
    ref = model or (run.base_model if run else None)
    if not ref:
        raise PoetError("pass --model PATH_OR_HUB_ID (or --adapter-path RUN, whose base model is used)")
    loaded, tokenizer, _ = load_model(ref, (run.config.get("revision") if run and not model else None),
                                      trust_remote_code)
    if run:
        load_adapters(loaded, run.path)
    loaded.eval()
    from ..data.tokenization import turn_end_warning

    notes = [] if getattr(tokenizer, "has_chat_template", False) else [
        "the tokenizer has no chat template: turns are sent as plain 'role: content' lines"]
    notes += [w for w in [turn_end_warning(tokenizer, template_kwargs)] if w]
    return LoadedChat(loaded, tokenizer, ref, str(run.path) if run else None,
                      run.fine_tune_type if run else None, notes)


def jsonl_rows(lines: list[str], path) -> Iterator[tuple[int, object, str]]:
    """(line number, parsed value, line) of every non-blank JSON line; PoetError at the first invalid one."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line), line
        except ValueError as exc:
            raise PoetError(f"{path}:{i}: not valid JSON ({exc.msg}); each line must be an object like "
                            '{"prompt": "..."}') from None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file (or "-" for stdin): JSONL objects with a "prompt" string when the name ends in
    .jsonl, otherwise one prompt per non-empty line."""
    import sys

    path = Path(path).expanduser()
    if str(path) == "-":
        text = sys.stdin.read()
    elif not path.exists() or path.is_dir():
        raise PoetError(f"prompts file not found: {path}")
    else:
        text = path.read_text(encoding="utf-8")  # also pipes such as bash's <(...)
    lines = text.splitlines()
    if path.suffix != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for i, row, line in jsonl_rows(lines, path):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise PoetError(f'{path}:{i}: expected an object with a "prompt" string, got {line[:80]!r}')
            prompts.append(row["prompt"])
    if not prompts:
        raise PoetError(f"{path} holds no prompts")
    return prompts


def generate_replies(model, tokenizer, prompts: Iterable[str], sampling: Sampling,
                     system: Optional[str] = None, batch_size: Optional[int] = None,
                     template_kwargs: Optional[dict] = None) -> Iterator[dict]:
    """One record per prompt, in order: {"prompt", "reply", "tokens", "tokens_per_second", "finish_reason"}.

    Each prompt is one user turn (after the system prompt, if any) through the chat template. Replies are
    sampled `batch_size` at a time (None: `sampling.batch_rows`), in chunks of 4 x batch_size prompts
    (None: `sampling.BATCH_SIZE`) whose records come out together; tokens_per_second is the chunk's throughput. With a
    seed, every prompt is sampled from that seed, so a prompt's reply does not depend on the other prompts.
    """
    import random
    import time

    from .sampling import BATCH_SIZE, sample

    sampling.check()
    prompts = list(prompts)
    rng = random.Random()
    size = 4 * batch_size if batch_size else BATCH_SIZE
    for start in range(0, len(prompts), size):
        chunk = prompts[start:start + size]
        ids = [encode_messages(tokenizer, ([{"role": "system", "content": system}] if system else [])
                               + [{"role": "user", "content": p}], template_kwargs) for p in chunk]
        seeds = [sampling.seed if sampling.seed is not None else rng.getrandbits(31) for _ in chunk]
        tic = time.perf_counter()
        replies = sample(model, tokenizer, ids, seeds, sampling.max_tokens, sampling.temperature, sampling.top_p,
                         batch_size=batch_size)
        rate = sum(len(r.ids) + r.finished for r in replies) / max(time.perf_counter() - tic, 1e-9)
        for prompt, r in zip(chunk, replies):
            yield {"prompt": prompt, "reply": r.text, "tokens": len(r.ids), "tokens_per_second": rate,
                   "finish_reason": "stop" if r.finished else "length"}

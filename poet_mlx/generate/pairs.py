"""On-policy preference pairs (`poet-mlx pairs`): sample N replies per prompt, judge them, keep best vs worst.

For every prompt the model (optionally with a run's adapters) samples `samples` replies, each from its own seed
(`sampling.SeededSampler`), in batches. A judge (the `--judge` specs of `poet-mlx eval`, e.g.
`poet_mlx.analysis.constraints:judge`) scores them; the pair is chosen = the best finished reply, rejected =
the worst reply. A prompt whose replies all score the same (a tie), or whose best-worst margin is under
`min_margin`, or that has no finished reply to be chosen, gives no pair: it is counted, never silently lost.

The output is a TRL conversational preference file (`prompt` messages, `chosen`/`rejected` assistant
messages), each row with its scores and the settings that made it, and the prompt row's own extra fields
(e.g. `constraints`). It is written a chunk of prompts at a time; `OUT.progress.json` records how far it got
(prompts done, bytes of OUT, counts), so an interrupted run continues where it stopped, and a finished one is
not redone. A replies-per-prompt, seed or model change is a different file: it is refused, not mixed in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import PoetError
from ..fsutil import write_json_atomic
from ..reporting import Reporter

PROGRESS_SUFFIX = ".progress.json"
CHUNK_REPLIES = 64
"""Replies sampled between two commits of the output (a kill loses at most this much work)."""


@dataclass(frozen=True)
class PairsOptions:
    """How replies are sampled and pairs kept."""

    samples: int = 4
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    min_margin: float = 0.0
    batch_size: Optional[int] = None
    """Replies generated together; None: `sampling.batch_rows` (up to 64, fewer for a large KV cache)."""
    system: Optional[str] = None
    chat_template_config: Optional[str] = None
    """Extra chat-template arguments as a JSON object (mlx-lm's --chat-template-config)."""

    def check(self) -> None:
        problems = [(self.samples >= 2, "--samples must be >= 2 (a pair needs two replies)"),
                    (self.max_tokens >= 1, "--max-tokens must be >= 1"),
                    (self.temperature > 0, "--temperature must be > 0: greedy replies would all be the same"),
                    (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
                    (self.min_margin >= 0, "--min-margin must be >= 0"),
                    (self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")]
        for ok, message in problems:
            if not ok:
                raise PoetError(message)


@dataclass
class PairsSummary:
    """What a `build_pairs` run did (totals over every session of this output file)."""

    out: str
    prompts: int
    done: int
    pairs: int
    skipped: dict = field(default_factory=lambda: {"tie": 0, "margin": 0, "unfinished": 0})
    replies: int = 0
    reply_tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def read_prompt_rows(path: str | Path) -> list[dict]:
    """Prompt rows of a .jsonl file: objects with a "prompt" string or message list (other fields are kept)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PoetError(f"prompts file not found: {path}")
    from .chat import jsonl_rows

    rows = []
    for i, row, line in jsonl_rows(path.read_text(encoding="utf-8").splitlines(), path):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        messages_ok = isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt)
        if not (isinstance(prompt, str) and prompt.strip()) and not messages_ok:
            raise PoetError(f'{path}:{i}: expected an object with a non-empty "prompt" (a string or a list of '
                            f'{{"role", "content"}} messages), got {line[:80]!r}')
        rows.append(row)
    if not rows:
        raise PoetError(f"{path} holds no prompts")
    return rows


def prompt_messages(row: dict, system: Optional[str] = None) -> list[dict]:
    """The row's prompt as chat messages (a string is one user turn), with `system` first if it has none."""
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def choose(scores: list[float], finished: list[bool], min_margin: float) -> tuple[Optional[tuple[int, int]], str]:
    """(chosen index, rejected index) or None with the reason ("tie", "margin", "unfinished").

    Chosen: the first finished reply with the best score among finished ones; rejected: the first reply with
    the lowest score. The margin chosen - rejected must be > 0 and >= min_margin.
    """
    if max(scores) == min(scores):
        return None, "tie"
    done = [i for i, f in enumerate(finished) if f]
    if not done:
        return None, "unfinished"
    best = max(done, key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    margin = scores[best] - scores[worst]
    if margin <= 0:
        return None, "unfinished" if max(scores) > scores[best] else "tie"
    if margin < min_margin:
        return None, "margin"
    return (best, worst), ""


class PairsFile:
    """The output file (and the optional file of every judged reply) with their progress record: resume where
    a run stopped, refuse other settings."""

    def __init__(self, out: str | Path, settings: dict, overwrite: bool = False, samples_out: str | Path | None = None):
        self.out = Path(out).expanduser()
        self.samples_out = Path(samples_out).expanduser() if samples_out else None
        self.progress_path = self.out.with_name(self.out.name + PROGRESS_SUFFIX)
        self.settings = settings
        self.state = {"settings": settings, "next": 0, "bytes": 0, "samples_bytes": 0, "complete": False,
                      "counts": {"pairs": 0, "tie": 0, "margin": 0, "unfinished": 0, "replies": 0,
                                 "reply_tokens": 0, "seconds": 0.0}}
        if overwrite:
            for p in (self.out, self.progress_path, self.samples_out):
                if p is not None:
                    p.unlink(missing_ok=True)
        elif self.progress_path.is_file():
            saved = json.loads(self.progress_path.read_text())
            if saved.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                                 if settings.get(k) != saved.get("settings", {}).get(k))
                raise PoetError(f"{self.out} was started with other settings ({', '.join(changed)}); continue "
                                "with the same ones, pass --overwrite to start over, or choose another --out")
            self.state = {"samples_bytes": 0, **saved}
        elif self.out.exists() and self.out.stat().st_size:
            raise PoetError(f"{self.out} exists and was not written by `poet-mlx pairs` (no {self.progress_path.name}); "
                            "pass --overwrite to replace it, or choose another --out")
        for path, size in ((self.out, self.state["bytes"]), (self.samples_out, self.state["samples_bytes"])):
            if path is not None:  # drop what a chunk wrote before its progress was recorded
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a+b") as f:
                    f.truncate(size)

    def commit(self, lines: list[str], sample_lines: list[str], next_index: int, counts: dict, complete: bool) -> None:
        """Append the chunk's rows (flushed to disk) and only then move the progress record past them."""
        sizes = {}
        for key, path, chunk in (("bytes", self.out, lines), ("samples_bytes", self.samples_out, sample_lines)):
            if path is None:
                continue
            with open(path, "ab") as f:
                f.write("".join(chunk).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                sizes[key] = f.tell()
        self.state.update({"next": next_index, "complete": complete, "counts": counts, **sizes})
        write_json_atomic(self.progress_path, self.state)


def build_pairs(model, tokenizer, rows: list[dict], judge, opts: PairsOptions, out: str | Path, settings: dict,
                reporter: Optional[Reporter] = None, should_stop: Callable[[], bool] = lambda: False,
                overwrite: bool = False, samples_out: str | Path | None = None) -> PairsSummary:
    """Sample, judge and write pairs for `rows` (see the module docstring). Returns the summary.

    Args:
        judge: an object with `.name` and `.score(samples, tokenizer)` (`analysis.judges.load_judge`).
        settings: what identifies this file (model, adapters, judge, prompts file, opts); a resumed run must
            have the same.
        samples_out: also write every judged reply here, one JSON object each (`sample_record`), pairs or not.
    """
    import time

    opts.check()
    reporter = reporter or Reporter()
    file = PairsFile(out, settings, overwrite, samples_out)
    counts = dict(file.state["counts"])
    start, n = file.state["next"], len(rows)
    per_chunk = max(1, CHUNK_REPLIES // opts.samples)
    i = start
    while i < n and not file.state["complete"]:
        if should_stop():
            break
        tic = time.perf_counter()
        chunk = list(range(i, min(n, i + per_chunk)))
        reporter.phase("sampling and judging", i, n, note=f"{counts['pairs']} pairs so far")
        samples = judged_samples(model, tokenizer, rows, chunk, judge, opts)
        lines = []
        sample_lines = [json.dumps(sample_record(rows[s.index], s), ensure_ascii=False) + "\n" for s in samples]
        for j, idx in enumerate(chunk):
            mine = samples[j * opts.samples:(j + 1) * opts.samples]
            picked, reason = choose([s.score for s in mine], [s.finished for s in mine], opts.min_margin)
            if picked is None:
                counts[reason] += 1
                continue
            lines.append(json.dumps(_pair_row(rows[idx], idx, mine, picked, settings, opts), ensure_ascii=False)
                         + "\n")
            counts["pairs"] += 1
        counts["replies"] += len(samples)
        counts["reply_tokens"] += sum(len(x.reply_ids) for x in samples)
        counts["seconds"] += time.perf_counter() - tic
        i = chunk[-1] + 1
        file.commit(lines, sample_lines, i, counts, complete=i >= n)
    reporter.phase("sampling and judging", i, n, note=f"{counts['pairs']} pairs")
    return PairsSummary(str(file.out), n, i, counts["pairs"],
                        {k: counts[k] for k in ("tie", "margin", "unfinished")}, counts["replies"],
                        counts["reply_tokens"], counts["seconds"], interrupted=i < n)


def judged_samples(model, tokenizer, rows: list[dict], indices: list[int], judge, opts: PairsOptions) -> list:
    """`opts.samples` judged replies (`analysis.generations.Sample`, with .score) per row of `indices`, grouped
    by row; reply k of row i is seeded opts.seed + i * opts.samples + k."""
    from ..analysis.generations import Sample, prompt_text
    from ..config import parse_template_config
    from .sampling import sample

    kw = parse_template_config(opts.chat_template_config, "--chat-template-config")
    prompts = [_encode(tokenizer, prompt_messages(rows[i], opts.system), kw) for i in indices]
    flat = [(j, k) for j in range(len(indices)) for k in range(opts.samples)]
    seeds = [opts.seed + indices[j] * opts.samples + k for j, k in flat]
    replies = sample(model, tokenizer, [prompts[j] for j, _ in flat], seeds, opts.max_tokens, opts.temperature,
                     opts.top_p, batch_size=opts.batch_size)
    samples = [Sample(indices[j], prompt_text(_Row(rows[indices[j]]["prompt"])), "policy", r.text, r.ids, r.finished,
                      seed, prompt_ids=prompts[j]) for (j, _), seed, r in zip(flat, seeds, replies)]
    for x, score in zip(samples, judge.score(samples, tokenizer)):
        x.score = score
    return samples


@dataclass
class _Row:
    """What `generations.prompt_text` reads from a row."""

    prompt: object


def sample_record(row: dict, sample) -> dict:
    """One judged reply of `samples_out`: prompt index, seed, reply, its tokens, finished, score, and the prompt
    row's other fields (e.g. `constraints`)."""
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    return {"prompt_index": sample.index, "seed": sample.seed, "reply": sample.reply, "tokens": len(sample.reply_ids),
            "finished": sample.finished, "score": sample.score, **extra}


def _encode(tokenizer, messages: list[dict], template_kwargs: Optional[dict] = None) -> list[int]:
    from .chat import encode_messages

    return encode_messages(tokenizer, messages, template_kwargs)


def _pair_row(row: dict, index: int, samples: list, picked: tuple[int, int], settings: dict,
              opts: PairsOptions) -> dict:
    """The TRL conversational row of one pair, with scores, settings and the prompt row's other fields."""
    best, worst = picked
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    return {
        "prompt": prompt_messages(row, opts.system),
        "chosen": [{"role": "assistant", "content": samples[best].reply}],
        "rejected": [{"role": "assistant", "content": samples[worst].reply}],
        "score_chosen": samples[best].score,
        "score_rejected": samples[worst].score,
        "scores": [s.score for s in samples],
        "finished": [s.finished for s in samples],
        "prompt_index": index,
        "settings": settings,
        **extra,
    }

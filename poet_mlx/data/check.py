"""`poet-mlx data check DATA`: what the data looks like after the template and the length cuts, before any
training. The library side; the CLI draws the result. It only reads: it never writes or trains.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import RunConfig
from ..errors import PoetError

SHOWN_PROBLEMS = 5
TOKENIZER_FILES = ["*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "*.py"]


def load_tokenizer(model: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The mlx-lm tokenizer of `model` (a local folder, or a hub id: only its tokenizer files are fetched)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    from ..catalog import is_catalog_name
    from ..models import HUB_ID, resolve_model_path

    local = Path(model).expanduser()
    if local.exists() or is_catalog_name(model):  # a folder, a .gguf file (converted) or a catalog name
        path = resolve_model_path(model)
    elif HUB_ID.match(model):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model, revision=revision, allow_patterns=TOKENIZER_FILES))
        except Exception as exc:  # offline, unknown or gated repo: all user-fixable
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise PoetError(f"could not get the tokenizer of '{model}' from the Hugging Face hub "
                            f"({type(exc).__name__}: {first}). Check the id and your network, or pass a local "
                            "model folder") from None
    else:
        raise PoetError(f"model not found: '{model}' is neither a local folder nor a Hugging Face hub id "
                        "(owner/name)")
    try:
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    try:
        return mlx_load_tokenizer(path, {"trust_remote_code": trust_remote_code}, eos_token_ids=eos)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PoetError(f"could not load the tokenizer in {path}: {first}") from None
NO_LIMIT = 1 << 40


def _stats(values: Sequence[float]) -> dict:
    if not len(values):
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": int(a.min()), "median": float(np.median(a)), "mean": float(a.mean()),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def _chars(text) -> int:
    return len(text) if isinstance(text, str) else sum(len(m["content"]) for m in text)


def _key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)


def row_report(rows: list, load_report) -> dict:
    """Counts, duplicates and character lengths of one split's valid rows."""
    full = Counter(_key(r.prompt, r.chosen, r.rejected, r.system) for r in rows)
    prompts = Counter(_key(r.prompt, r.system) for r in rows)
    kinds = getattr(load_report, "problem_kinds", {}) or {}
    return {
        "format": load_report.format,
        "rows": load_report.rows_read,
        "valid_rows": len(rows),
        "invalid_rows": load_report.rows_skipped,
        "problem_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "problems": list(load_report.problems[:SHOWN_PROBLEMS]),
        "identical_pairs": sum(n for k, n in kinds.items() if "identical" in k),
        "duplicate_rows": sum(n - 1 for n in full.values()),
        "repeated_prompts": sum(n - 1 for n in prompts.values()),
        "notes": list(load_report.notes),
        "chars": {name: _stats([_chars(getattr(r, name)) for r in rows]) for name in ("prompt", "chosen", "rejected")},
    }


def token_report(rows: list, tokenizer, cfg: RunConfig) -> dict:
    """Token lengths after the chat template and EOS, what the length limits cut or drop, and what POET cuts.

    The rows are tokenized once without limits; the limits are then applied exactly as training applies
    them (`tokenization._cut`), so the counts match what `poet-mlx train` reports.
    """
    from ..poet import scored_lengths
    from .tokenization import TokenizeReport, _cut, tokenize_pairs, uses_chat_template

    d, ls = cfg.data, cfg.loss
    full, _ = tokenize_pairs(rows, tokenizer, NO_LIMIT, NO_LIMIT - 1, d.chat_template,
                             assistant_header=d.assistant_header, template_kwargs=d.template_kwargs)
    limits = TokenizeReport(pairs_in=len(full))
    kept = []
    for p in full:
        cut = _cut(list(p.prompt), list(p.chosen), list(p.rejected), d.max_length, d.resolved_max_prompt_length, limits)
        if cut is not None:
            kept.append(cut)
    limits.pairs_out = len(kept)
    poet_cut, removed, response_tokens = 0, 0, 0
    for _, c, r in kept:
        sc, sr = scored_lengths(len(c), len(r), True, ls.poet_ratio)
        if sc < len(c) or sr < len(r):
            poet_cut += 1
        removed += len(c) - sc + len(r) - sr
        response_tokens += len(c) + len(r)
    return {
        "chat_template": uses_chat_template(tokenizer, d.chat_template),
        "tokens": {"prompt": _stats([len(p.prompt) for p in full]),
                   "chosen": _stats([len(p.chosen) for p in full]),
                   "rejected": _stats([len(p.rejected) for p in full]),
                   "pair": _stats([len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in full])},
        "limits": {"max_length": d.max_length, "max_prompt_length": d.resolved_max_prompt_length,
                   "prompts_cut": limits.prompts_cut, "pairs_with_responses_cut": limits.responses_cut,
                   "pairs_dropped": dict(limits.dropped), "pairs_kept": len(kept)},
        "poet": {"poet_ratio": ls.poet_ratio, "pairs_cut": poet_cut,
                 "mean_tokens_removed_per_cut_pair": removed / poet_cut if poet_cut else 0.0,
                 "response_tokens_removed": removed / response_tokens if response_tokens else 0.0},
    }


def check_data(cfg: RunConfig, tokenizer=None) -> dict:
    """The `poet-mlx data check` report of cfg.data (every split present), as a JSON-ready dict.

    Rows are read leniently (invalid rows are counted and listed, not fatal) so the report shows everything
    at once; `errors` lists what would stop `poet-mlx train` with these settings, `ok` is True when nothing
    would. Without a tokenizer only character lengths are reported.

    Raises:
        PoetError: the data source does not exist, is not reachable, or its train split has no valid row.
    """
    from .sources import SPLITS, check_source, load_split

    d = cfg.data
    check_source(d)
    lenient = dataclasses.replace(d, skip_invalid=True)
    report: dict = {"source": d.data, "splits": {}, "errors": [], "hints": []}
    for split in SPLITS:
        try:
            rows, load_report = load_split(lenient, split)
        except PoetError as exc:
            if split == "train":  # unreadable, unreachable or entirely invalid: nothing else to report
                raise
            report["splits"][split] = {"error": str(exc)}
            report["errors"].append(f"{split}: {exc}")
            continue
        if load_report.format == "none":
            continue
        info = row_report(rows, load_report)
        if info["invalid_rows"] and not d.skip_invalid:
            n = info["invalid_rows"]
            report["errors"].append(f"{split}: {n} invalid row{'s' if n != 1 else ''} of {info['rows']}; training "
                                    "stops on them: fix them, or pass --skip-invalid to drop them")
        if tokenizer is not None and rows:
            try:
                info.update(token_report(rows, tokenizer, cfg))
            except PoetError as exc:  # e.g. conversational rows and a tokenizer without a chat template
                report["errors"].append(f"{split}: {exc}")
            else:
                if not info["limits"]["pairs_kept"]:
                    report["errors"].append(
                        f"{split}: the length limits drop every pair; raise --max-length (now {d.max_length}) "
                        f"or --max-prompt-length (now {d.resolved_max_prompt_length})")
        report["splits"][split] = info
    if "train" not in report["splits"]:
        report["errors"].append(f"no train split in {d.data}")
    _hints(report, tokenizer is not None)
    report["ok"] = not report["errors"]
    return report


def _hints(report: dict, tokenized: bool) -> None:
    hints = report["hints"]
    for split, info in report["splits"].items():
        if info.get("duplicate_rows"):
            hints.append(f"{split}: {info['duplicate_rows']} rows repeat an earlier row exactly (they weigh double)")
        dropped = sum(info.get("limits", {}).get("pairs_dropped", {}).values())
        if dropped:
            hints.append(f"{split}: the length limits drop {dropped} pairs; raise --max-length to keep them")
        cut = info.get("limits", {}).get("pairs_with_responses_cut", 0)
        if cut:
            hints.append(f"{split}: {cut} pairs have a response cut by --max-length (their EOS is lost)")
    if not tokenized:
        hints.append("token lengths, length-limit cuts and POET cuts need the tokenizer: pass --model")

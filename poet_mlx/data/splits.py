"""One data split (train, valid or test), read and tokenized as a run's settings say, with what was cut or dropped.

`read_split` reads and validates rows (no tokenizer needed, so data mistakes surface before a model loads);
`tokenize_split` applies the chat template and length limits. Training and evaluation both go through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import RunConfig
from ..errors import PoetError
from ..reporting import Reporter
from .tokenization import TokenizeReport, tokenize_pairs


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
    from .sources import load_split

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
    pairs, tok = tokenize_pairs(rows, tokenizer, d.max_length, d.resolved_max_prompt_length, d.chat_template,
                                progress=lambda done, total: reporter.phase(name, done, total),
                                assistant_header=d.assistant_header, template_kwargs=d.template_kwargs)
    if not pairs:
        reasons = "; ".join(f"{n} {why}" for why, n in tok.dropped.items())
        raise PoetError(f"all {len(rows)} {split} pairs were dropped by the length limits ({reasons}); raise "
                        f"--max-length (now {d.max_length}) or --max-prompt-length (now {d.resolved_max_prompt_length})")
    if split == "train" and d.chat_template:
        from .tokenization import turn_end_warning

        warning = turn_end_warning(tokenizer, d.template_kwargs)
        if warning:
            reporter.warning(warning)
    return SplitData(pairs, load_report.rows_read, load_report.rows_skipped, load_report.format, tok,
                     list(load_report.notes) + list(load_report.problems))


def eval_splits(data: str) -> tuple[str, ...]:
    """Which splits `poet-mlx eval --data X` reads: a file is scored whole; a folder's test split first."""
    path = Path(data).expanduser()
    if path.is_file():
        return ("train",)
    if path.is_dir():
        return ("test", "valid", "train")
    return ("valid",)

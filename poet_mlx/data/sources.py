"""Preference data: read rows from a file, a folder or a Hugging Face dataset, normalized and validated.

Sources (`DataConfig.data`):
- a file: `.jsonl` (one JSON object per line, blank lines ignored), `.json` (a list of rows, `{"data": [...]}`,
  a dict of equal-length columns, or JSON-lines content) or `.parquet`. A file is the train split only.
- a folder with `train.{jsonl,json,parquet}` and optionally `valid.*` (or `validation.*`) and `test.*`, as
  mlx-lm users are used to (`--train-split`/`--valid-split` rename the files looked for).
- a Hugging Face dataset id (`owner/name`), loaded with `datasets` (`--data-config`, `--train-split`,
  `--valid-split`).

Row formats are TRL's (see `data_formats`). Locations in messages: `line N` (1-based) for JSON-lines files,
`row N` (0-based, as in the dataset viewer and in Python) for everything else. A malformed row stops loading
with one error that lists the first few problems, unless `skip_invalid` drops such rows (counted in the report).

System prompt: with `DataConfig.system_prompt` set, standard rows without their own `system` field get it as
`PreferenceRow.system`, and conversational rows whose prompt has no system message get one prepended.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from ..config import DataConfig
from ..errors import PoetError
from .formats import (
    Item,
    LoadReport,
    PreferenceRow,
    collect_rows,
    describe,
    extract_prompt,
    iter_records,
)

__all__ = ["PreferenceRow", "LoadReport", "load_split", "load_rows_from_file", "rows_from_records",
           "extract_prompt", "apply_system_prompt", "SPLITS"]

SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json", ".parquet")
VALID_SPLIT_NAMES = ("valid", "validation", "test", "test_prefs")
TEST_SPLIT_NAMES = ("test", "test_prefs")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_NOT_HUB_SUFFIXES = SUFFIXES + (".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".yaml", ".yml")
MAX_LINE_BYTES = 16 * 2**20
"""A JSON-lines row longer than this is refused (a row problem) before it is decoded or parsed: preference rows
are a few KB, and a 50 MB "row" is a wrong file or a missing line break that would only stall tokenization."""
_ENCODING_FIX = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"


def rows_from_records(records: Iterable[dict], where_prefix: str,
                      skip_invalid: bool = False) -> tuple[list[PreferenceRow], LoadReport]:
    """Normalize and validate in-memory records; record `i` is located as "{where_prefix} row {i}".

    Raises:
        PoetError: no records; an invalid record (unless `skip_invalid`); every record invalid.
    """
    return collect_rows(iter_records(records, where_prefix), where_prefix, skip_invalid)


def load_split(cfg: DataConfig, split: str) -> tuple[list[PreferenceRow], LoadReport]:
    """Load the `split` ("train", "valid" or "test") of `cfg.data`, with `cfg.system_prompt` applied.

    A missing valid/test split gives `[]` and a report with format "none"; a missing train split is an error.

    Raises:
        PoetError: missing file, unreadable or invalid data, unknown hub dataset or split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_source(cfg)
    path = Path(cfg.data).expanduser()
    if path.is_file():
        if split != "train":
            return [], _absent(str(path), f"no {split} data: a single file ({path}) is the train split only")
        rows, report = load_rows_from_file(path, cfg.skip_invalid)
    elif path.is_dir():
        found = _folder_file(path, split, cfg)
        if found is None:
            return [], _absent(str(path), f"no {split} data in folder {path}")
        rows, report = load_rows_from_file(found, cfg.skip_invalid)
    else:  # hub-id shaped (check_source ruled out the rest)
        rows, report = _load_hub(cfg, split)
    return apply_system_prompt(rows, cfg.system_prompt), report


def check_source(cfg: DataConfig) -> None:
    """Fail fast, before a model loads, when `cfg.data` is neither a local path nor hub-id shaped."""
    if not cfg.data:
        raise PoetError("no data given: pass --data FILE_OR_FOLDER_OR_HUB_ID")
    if not Path(cfg.data).expanduser().exists() and not _looks_like_hub_id(cfg.data):
        raise PoetError(f"data file not found: {cfg.data} (pass a .jsonl/.json/.parquet file, a folder with "
                        "train/valid files, or a Hugging Face dataset id like owner/name)")


def apply_system_prompt(rows: list[PreferenceRow], system_prompt: Optional[str]) -> list[PreferenceRow]:
    """Give `system_prompt` to rows without one (standard: `system`; conversational: a leading message)."""
    if not system_prompt:
        return rows
    out = []
    for row in rows:
        if row.conversational and not any(m["role"] == "system" for m in row.prompt):
            row = dataclasses.replace(row, prompt=[{"role": "system", "content": system_prompt}] + row.prompt,
                                      system=system_prompt)
        elif not row.conversational and row.system is None:
            row = dataclasses.replace(row, system=system_prompt)
        out.append(row)
    return out


def _absent(source: str, note: str) -> LoadReport:
    return LoadReport("none", 0, 0, [], source, [note])


# ---------------------------------------------------------------------------------------------- files


def load_rows_from_file(path: Path, skip_invalid: bool = False) -> tuple[list[PreferenceRow], LoadReport]:
    """Read and validate one `.jsonl`, `.json` or `.parquet` file of preference rows."""
    path = Path(path)
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PoetError(f"unsupported data file type '{path.suffix or path.name}' ({name}): use .jsonl, .json or "
                        ".parquet")
    if not path.exists():
        raise PoetError(f"data file not found: {name}")
    if not path.is_file():
        raise PoetError(f"{name} is not a file")
    if suffix == ".parquet":
        items: Iterable[Item] = iter_records(_parquet_records(path), name)
    else:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PoetError(f"could not read {name}: {exc.strerror or exc}") from None
        _check_text_file(raw, name)
        items = _json_items(raw, name) if suffix == ".json" else _jsonl_items(raw, name)
    return collect_rows(items, name, skip_invalid)


def _parquet_records(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PoetError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise PoetError(f"could not read Parquet file {path}: {_first_line(exc)}") from None


def _check_text_file(raw: bytes, name: str) -> None:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PoetError(f"{name} is UTF-16 encoded; {_ENCODING_FIX.replace('latin1', 'utf-16')}")
    if raw.startswith(b"PAR1"):
        raise PoetError(f"{name} is a Parquet file; rename it to end in .parquet")
    if b"\x00" in raw[:65536]:
        raise PoetError(f"{name} contains NUL bytes: it looks like a binary or UTF-16 file, not UTF-8 JSON; "
                        f"{_ENCODING_FIX}")


def _jsonl_items(raw: bytes, name: str) -> list[Item]:
    """One item per non-blank line; undecodable or unparsable lines become row problems."""
    items: list[Item] = []
    start = 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        offset, start = start, start + len(line) + 1
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
            line, offset = line[3:], offset + 3
        if not line.strip():
            continue
        rec, problem = None, None
        if len(line) > MAX_LINE_BYTES:
            problem = (f"line too long ({len(line) / 2**20:.1f} MB; the limit is {MAX_LINE_BYTES >> 20} MB per row): "
                       "is this really JSON Lines, one row per line? Split or shorten it")
            items.append((len(items), f"{name} line {lineno}", rec, problem))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = (f"not valid UTF-8: byte 0x{line[exc.start]:02x} at byte offset {offset + exc.start} of the "
                       f"file (column {exc.start + 1} of the line); {_ENCODING_FIX}")
        else:
            try:
                rec = json.loads(text)
            except RecursionError:
                problem = "JSON nested too deeply"
            except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
                detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
                problem = f"not valid JSON ({detail}); each line must hold one JSON object"
        items.append((len(items), f"{name} line {lineno}", rec, problem))
    if items and items[0][3] and items[0][3].startswith("not valid JSON"):
        # Maybe a whole JSON document (a list, pretty-printed) in a .jsonl file: accept it if it parses.
        try:
            return list(_json_records(json.loads(raw.decode("utf-8-sig")), name))
        except (ValueError, RecursionError, PoetError):
            pass
    return items


def _json_items(raw: bytes, name: str) -> Iterable[Item]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PoetError(f"{name} is not valid UTF-8: byte 0x{raw[exc.start]:02x} on line {line} (byte offset "
                        f"{exc.start} of the file); {_ENCODING_FIX}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise PoetError(f"{name}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Extra data"):  # several JSON values: JSON-lines content
            return _jsonl_items(raw, name)
        raise PoetError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise PoetError(f"{name} is not valid JSON: {exc}") from None
    return _json_records(data, name)


def _json_records(data: Any, name: str) -> Iterable[Item]:
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict) and "chosen" in data:
        data = _columns_to_rows(data)
    if not isinstance(data, list):
        raise PoetError(f"{name}: expected a list of rows (or {{\"data\": [...]}}), got {describe(data)}")
    return iter_records(data, name)


def _columns_to_rows(data: dict) -> list:
    """A dict of equal-length columns ({"prompt": [...], "chosen": [...], ...}) as rows; else one row."""
    chosen = data["chosen"]
    columnar = isinstance(chosen, list) and chosen and not isinstance(chosen[0], dict)
    if columnar and all(isinstance(v, list) and len(v) == len(chosen) for v in data.values()):
        return [dict(zip(data, values)) for values in zip(*data.values())]
    return [data]


# ---------------------------------------------------------------------------------------------- folders


def _folder_file(folder: Path, split: str, cfg: DataConfig) -> Optional[Path]:
    """The file holding `split` in an mlx-lm style folder (None when an optional split is absent)."""
    if split == "train":
        stems = (cfg.train_split,)
    elif split == "valid":
        stems = (cfg.valid_split,) if cfg.valid_split else ("valid", "validation")
    else:
        stems = ("test",)
    found = [folder / f"{s}{x}" for s in stems for x in SUFFIXES if (folder / f"{s}{x}").is_file()]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise PoetError(f"folder {folder} has several files for the {split} split ({names}); keep one")
    if found:
        return found[0]
    if split == "train" or (split == "valid" and cfg.valid_split):
        wanted = ", ".join(f"{stems[0]}{x}" for x in SUFFIXES)
        present = sorted(p.name for p in folder.iterdir())
        listing = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") if present else "nothing"
        raise PoetError(f"folder {folder} has no {split} file: expected one of {wanted} (it contains: {listing})")
    return None


# ---------------------------------------------------------------------------------------------- hub


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(_NOT_HUB_SUFFIXES)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _hub_failure(repo: str, exc: BaseException) -> PoetError:
    reason = _first_line(exc).rstrip(".")
    hint = " Pick a configuration with --data-config." if "config" in reason.lower() else ""
    return PoetError(f"could not load dataset '{repo}' from the Hugging Face hub: {reason}. Check the id and your "
                     f"network, or pass a local .jsonl/.json/.parquet file or a folder (there is no local file or "
                     f"folder '{repo}').{hint}")


def _split_base(split: str) -> str:
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()  # "train[:1000]" -> "train"


def _pick_split(repo: str, names: list[str], cfg: DataConfig, split: str, notes: list[str]) -> Optional[str]:
    have = ", ".join(names) or "none"
    if split == "train":
        if _split_base(cfg.train_split) in names:
            return cfg.train_split
        if cfg.train_split == "train" and "train_prefs" in names:
            notes.append(f"{repo} has no 'train' split; using 'train_prefs'")
            return "train_prefs"
        raise PoetError(f"hub dataset {repo} has no split '{cfg.train_split}' (it has: {have}); pass "
                        "--train-split NAME")
    if split == "valid" and cfg.valid_split:
        if _split_base(cfg.valid_split) in names:
            return cfg.valid_split
        raise PoetError(f"hub dataset {repo} has no split '{cfg.valid_split}' (it has: {have}); pass "
                        "--valid-split NAME")
    for name in VALID_SPLIT_NAMES if split == "valid" else TEST_SPLIT_NAMES:
        if name in names:
            if name.startswith("test") and split == "valid":
                notes.append(f"{repo} has no 'valid'/'validation' split; validating on '{name}'")
            return name
    return None


def _load_hub(cfg: DataConfig, split: str) -> tuple[list[PreferenceRow], LoadReport]:
    repo = cfg.data
    try:
        import datasets
    except ImportError:
        raise PoetError(f"loading the hub dataset '{repo}' needs the datasets package: pip install datasets") from None
    try:
        names = list(datasets.get_dataset_split_names(repo, config_name=cfg.data_config))
    except Exception as exc:  # network, unknown id, missing config: all reported the same way
        raise _hub_failure(repo, exc) from None
    label = f"hub dataset {repo}" + (f" (config {cfg.data_config})" if cfg.data_config else "")
    notes: list[str] = []
    chosen = _pick_split(repo, names, cfg, split, notes)
    if chosen is None:
        return [], _absent(label, f"{label} has no {split} split (it has: {', '.join(names)})")
    try:
        dataset = datasets.load_dataset(repo, name=cfg.data_config, split=chosen)
    except Exception as exc:
        raise _hub_failure(repo, exc) from None
    source = f"{label} split {chosen}"
    rows, report = collect_rows(iter_records(dataset, source), source, cfg.skip_invalid)
    report.notes[:0] = notes
    return rows, report

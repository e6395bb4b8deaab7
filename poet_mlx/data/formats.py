"""TRL's preference row formats: detect them, normalize every row to one shape, and validate it.

Accepted rows (extra fields, like UltraFeedback's `messages` or `score_chosen`, are ignored):

- standard: `{"prompt": str, "chosen": str, "rejected": str}`, optional `"system": str`;
- conversational: `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`, where a message is
  `{"role": "system"|"user"|"assistant"|"tool", "content": str}` and each response ends with an assistant turn;
- UltraFeedback-binarized style: `prompt` a string, `chosen`/`rejected` full conversations that start with that
  prompt as a user turn: the shared leading messages become the prompt;
- implicit prompt: no `prompt` field; `chosen`/`rejected` full strings or conversations whose common beginning
  is the prompt (`extract_prompt`, TRL's rule).

A conversational `prompt` with string responses, or a string `prompt` with assistant-only message responses, is
turned into a conversation (the string becomes a user turn; a string response an assistant turn).
Problems are collected per row; the caller decides whether to stop or to skip the row.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from ..errors import PoetError

ROLES = ("system", "user", "assistant", "tool")
SHOWN_IN_ERROR = 5
KEPT_IN_REPORT = 10

Text = Any  # str (standard) or list[dict] (conversational)


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair, normalized: `prompt` and both responses are all strings or all message lists.

    `system` is the row's system prompt: its `system` field (standard rows) or the content of the leading
    system message of a conversational prompt (which stays inside `prompt`). `where` locates the row for
    messages ("data/train.jsonl line 12"); `index` is its 0-based position in its source.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    conversational: bool
    system: Optional[str]
    where: str
    index: int


@dataclass
class LoadReport:
    """What loading found. `source` and `notes` (e.g. a split substitution) are for the user's log."""

    format: str  # "standard", "conversational", "implicit prompt (standard)", "implicit prompt (conversational)"
    rows_read: int
    rows_skipped: int
    problems: list[str]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    problem_kinds: dict[str, int] = field(default_factory=dict)
    """Every problem counted by kind ("missing field 'rejected'": 12), for reports; see `problem_kind`."""


def problem_kind(problem: str) -> str:
    """The gist of a row problem, without its location or details: what `poet-mlx data check` counts."""
    gist = re.split(r"[;(:]| at column| at character| but | got ", problem, maxsplit=1)[0].strip()
    return gist[:80]


class RowProblem(Exception):
    """A malformed row; the message says what and how to fix it, without the location."""


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split two full texts (or conversations) into their shared prompt and the two responses (TRL's rule).

    The prompt is the longest common prefix: characters for strings, whole messages for message lists. For
    strings, when the character just before the split is a space, the space goes to the responses. When one
    input begins with the whole other one, the last shared item is left to the responses (as TRL does), so
    both responses stay non-empty where possible.

    Returns:
        (prompt, chosen_rest, rejected_rest), each of the input's type.
    """
    if not (isinstance(chosen, str) and isinstance(rejected, str)) and not (
        isinstance(chosen, list) and isinstance(rejected, list)
    ):
        raise TypeError("extract_prompt needs two strings or two lists of messages")
    n = min(len(chosen), len(rejected))
    i = 0
    while i < n and chosen[i] == rejected[i]:
        i += 1
    if i == n:
        i = max(n - 1, 0)
    elif i > 0 and isinstance(chosen, str) and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _short(value: Any, limit: int = 40) -> str:
    try:
        text = repr(value)
    except Exception:  # e.g. ints past Python's digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A JSON-flavoured name for what was found: 'null', 'a number (3)', 'an object with keys a, b'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({_short(value)})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        keys = ", ".join(_short(k, 20).strip("'") for k in list(value)[:6])
        return f"an object with keys {keys}" if keys else "an empty object"
    return f"a {type(value).__name__}"


def _check_encodable(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowProblem(f"{what} contains an unpaired surrogate ({text[exc.start]!r} at character "
                         f"{exc.start}); fix the text's encoding") from None


def _content(value: Any, what: str) -> str:
    """A message's content as a string; text-only content parts ([{"type": "text", "text": ...}]) are joined."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else None
                found = _short(kind) if kind else describe(part)
                raise RowProblem(f"{what} has a content part that is not text ({found}); only text is supported")
            parts.append(part["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        raise RowProblem(f"{what} 'content' must be a string, got {describe(value)}")
    _check_encodable(value, what)
    return value


def _messages(value: list, name: str) -> list[dict]:
    out = []
    for i, msg in enumerate(value):
        what = f"field '{name}' message {i}"
        if not isinstance(msg, dict):
            raise RowProblem(f"{what} is {describe(msg)}; messages must be objects like "
                             '{"role": "user", "content": "..."}')
        if "role" not in msg or "content" not in msg:
            missing = "role" if "role" not in msg else "content"
            hint = ("this looks like ShareGPT's from/value format: rename 'from' to 'role' (with roles "
                    "user/assistant) and 'value' to 'content'" if "from" in msg or "value" in msg else
                    'messages look like {"role": "user", "content": "..."}')
            raise RowProblem(f"{what} has no '{missing}' key (it has: {', '.join(map(str, msg)) or 'nothing'}); "
                             f"{hint}")
        role = msg["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise RowProblem(f"{what} has role {_short(role)}; a role must be one of {', '.join(ROLES)}")
        extras = {k: v for k, v in msg.items() if k not in ("role", "content") and v is not None}
        out.append({"role": role, "content": _content(msg["content"], what), **extras})
    return out


def _field(rec: dict, name: str) -> Text:
    value = rec[name]
    if isinstance(value, str):
        _check_encodable(value, f"field '{name}'")
        return value
    if isinstance(value, list):
        return _messages(value, name)
    hint = " (remove the key to take the prompt from chosen/rejected)" if name == "prompt" and value is None else ""
    raise RowProblem(f"field '{name}' must be a string (standard format) or a list of messages "
                     f"(conversational), got {describe(value)}{hint}")


def _missing(rec: dict, names: list[str]) -> RowProblem:
    keys = [str(k) for k in rec]
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, keys, n=1, cutoff=0.7)
        if close:
            hints.append(f"rename '{close[0]}' to '{name}'")
    if "messages" in rec and not hints:
        hints.append("this looks like chat (SFT) data; preference data needs a 'chosen' and a 'rejected' response")
    fields_ = " and ".join(f"'{n}'" for n in names)
    return RowProblem(f"missing field{'s' if len(names) > 1 else ''} {fields_} (the row has: "
                      f"{', '.join(keys) or 'no fields'}); " + ("; ".join(hints) if hints else
                      "each row needs 'chosen' and 'rejected' (and usually 'prompt')"))


def _is_blank(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return all(not m["content"].strip() for m in text)


def _opens_with(conv: list[dict], prompt: str) -> bool:
    """Whether a conversation's first non-system message is the user turn `prompt`."""
    first = next((m for m in conv if m["role"] != "system"), None)
    return first is not None and first["role"] == "user" and first["content"].strip() == prompt.strip()


def _check_response(conv: list[dict], name: str) -> None:
    if not any(m["role"] == "assistant" for m in conv):
        raise RowProblem(f"field '{name}' has no assistant message; a response must end with "
                         '{"role": "assistant", "content": "..."}')
    if conv[-1]["role"] != "assistant":
        raise RowProblem(f"field '{name}' ends with a {conv[-1]['role']} message; a response must end with "
                         "an assistant message")


def _split_prompt(rec: dict, chosen: Text, rejected: Text, implicit: bool) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) with the prompt separated from the responses, whichever way the row gives it:
    implicitly (a shared opening), as a message list with string responses, or as the string opening of
    full conversations (UltraFeedback binarized)."""
    if implicit:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if _is_blank(prompt):
            unit = "text" if isinstance(prompt, str) else "messages"
            raise RowProblem(f"no 'prompt' field, and 'chosen' and 'rejected' do not begin with common {unit} to use "
                             "as the prompt (implicit prompt format); add a 'prompt' field")
        return prompt, chosen, rejected
    prompt = _field(rec, "prompt")
    if isinstance(prompt, list) and isinstance(chosen, str):
        chosen, rejected = ([{"role": "assistant", "content": t}] for t in (chosen, rejected))
    elif isinstance(prompt, str) and isinstance(chosen, list):
        if _opens_with(chosen, prompt) and _opens_with(rejected, prompt):  # UltraFeedback binarized
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        elif all(m["role"] in ("assistant", "tool") for m in chosen + rejected):
            prompt = [{"role": "user", "content": prompt}]
        else:
            raise RowProblem("field 'prompt' is a string but 'chosen'/'rejected' are conversations that do not "
                             "start with it as a user message; give 'prompt' as a list of messages too")
    return prompt, chosen, rejected


def normalize_record(rec: Any) -> tuple[Text, Text, Text, bool, Optional[str], str]:
    """Detect a row's format and normalize it.

    Returns:
        (prompt, chosen, rejected, conversational, system, format_name).
    Raises:
        RowProblem: what is wrong with the row and how to fix it (no location).
    """
    if not isinstance(rec, dict):
        raise RowProblem(f"row is {describe(rec)}, not an object; each row must be an object like "
                         '{"prompt": "...", "chosen": "...", "rejected": "..."}')
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise _missing(rec, missing)
    chosen, rejected = _field(rec, "chosen"), _field(rec, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowProblem(f"field 'chosen' is {describe(rec['chosen'])} but 'rejected' is {describe(rec['rejected'])}; "
                         "both must be strings (standard format) or both lists of messages (conversational)")
    implicit = "prompt" not in rec
    prompt, chosen, rejected = _split_prompt(rec, chosen, rejected, implicit)
    conversational = isinstance(prompt, list)
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise RowProblem(f"field 'system' must be a string, got {describe(system)}")
    if system is not None:
        _check_encodable(system, "field 'system'")
        system = system if system.strip() else None
    for name, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if _is_blank(text):
            raise RowProblem(f"field '{name}' is empty" + (" (or only whitespace)" if text else "")
                             + f"; every row needs a non-empty {name}")
    if conversational:
        if prompt[-1]["role"] == "assistant":
            raise RowProblem("field 'prompt' ends with an assistant message; the prompt must end with the turn "
                             "the responses answer (usually a user message)")
        _check_response(chosen, "chosen")
        _check_response(rejected, "rejected")
        if prompt[0]["role"] == "system":
            system = prompt[0]["content"]
        elif system is not None:
            prompt = [{"role": "system", "content": system}] + prompt
    if chosen == rejected:
        raise RowProblem("'chosen' and 'rejected' are identical; a preference pair needs two different responses")
    kind = "conversational" if conversational else "standard"
    return prompt, chosen, rejected, conversational, system, (f"implicit prompt ({kind})" if implicit else kind)


Item = tuple[int, str, Any, Optional[str]]  # (index, where, record, problem found while reading it)


def collect_rows(items: Iterable[Item], source: str, skip_invalid: bool) -> tuple[list[PreferenceRow], LoadReport]:
    """Normalize every item, check that one format is used throughout, and stop or skip on problems."""
    problems: list[tuple[int, str]] = []
    kinds: Counter = Counter()
    good: list[tuple[PreferenceRow, str]] = []
    total = 0
    for index, where, rec, problem in items:
        total += 1
        if problem is None:
            try:
                prompt, chosen, rejected, conv, system, fmt = normalize_record(rec)
            except RowProblem as exc:
                problem = str(exc)
            else:
                good.append((PreferenceRow(prompt, chosen, rejected, conv, system, where, index), fmt))
                continue
        problems.append((index, f"{where}: {problem}"))
        kinds[problem_kind(problem)] += 1
    if total == 0:
        raise PoetError(f"{source} has no rows; preference data needs rows with 'prompt', 'chosen' and 'rejected'")
    before = len(problems)
    kept = _one_format(good, source, problems)
    if len(problems) > before:
        kinds["mixed formats (standard and conversational rows)"] += len(problems) - before
    problems.sort(key=lambda p: p[0])
    texts = [p for _, p in problems]
    if texts and (not skip_invalid or not kept):
        raise PoetError(_problems_message(texts, total, source, all_bad=not kept))
    fmt = Counter(f for _, f in kept).most_common(1)[0][0]
    return [row for row, _ in kept], LoadReport(fmt, total, len(texts), texts[:KEPT_IN_REPORT], source,
                                                problem_kinds=dict(kinds))


def _one_format(good: list[tuple[PreferenceRow, str]], source: str, problems: list) -> list[tuple[PreferenceRow, str]]:
    """Keep the rows of the majority kind (standard or conversational); flag the others."""
    if not good:
        return []
    first: dict[bool, PreferenceRow] = {}
    for row, _ in good:
        first.setdefault(row.conversational, row)
    counts = Counter(row.conversational for row, _ in good)
    major = max(first, key=lambda k: (counts[k], -first[k].index))
    ref = first[major]
    ref_where = ref.where[len(source) + 1:] if ref.where.startswith(source + " ") else ref.where
    names = {True: "conversational (message lists)", False: "standard (strings)"}
    kept = []
    for row, fmt in good:
        if row.conversational == major:
            kept.append((row, fmt))
        else:
            problems.append((row.index, f"{row.where}: row is {names[row.conversational]} but {ref_where} is "
                                        f"{names[major]}; use one format for the whole dataset"))
    return kept


def _problems_message(texts: list[str], total: int, source: str, all_bad: bool) -> str:
    n = len(texts)
    shown = "\n".join(f"  - {t}" for t in texts[:SHOWN_IN_ERROR])
    first = f"; first {SHOWN_IN_ERROR}" if n > SHOWN_IN_ERROR else ""
    if all_bad:
        every = "the only row" if total == 1 else f"all {total} rows"
        return (f"{every} in {source} {'is' if total == 1 else 'are'} invalid{first}:\n{shown}\n"
                "Fix the data: preference rows need 'chosen' and 'rejected' (and usually 'prompt').")
    return (f"{n} invalid row{'s' if n != 1 else ''} in {source} (of {total} rows){first}:\n{shown}\n"
            f"Fix {'it' if n == 1 else 'them'}, or pass --skip-invalid to drop {'it' if n == 1 else 'them'}.")


def iter_records(records: Iterable[Any], where_prefix: str) -> Iterator[Item]:
    """Items for `collect_rows` from in-memory records, located as "{where_prefix} row {i}" (0-based)."""
    for i, rec in enumerate(records):
        yield i, f"{where_prefix} row {i}", rec, None

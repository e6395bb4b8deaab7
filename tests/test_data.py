"""Preference data loading: sources, TRL's row formats, validation messages, hub split logic (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poet_mlx.config import DataConfig
from poet_mlx.data.sources import (
    LoadReport,
    PreferenceRow,
    extract_prompt,
    load_rows_from_file,
    load_split,
    rows_from_records,
)
from poet_mlx.errors import PoetError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
GOOD_CONV = {"prompt": [U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")]}


class Raw(str):
    """A line written as it is (not JSON-encoded)."""


def write_jsonl(path: Path, rows) -> Path:
    lines = [r if isinstance(r, Raw) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------------------- extract_prompt


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("Q: hi A: yes", "Q: hi A: no", ("Q: hi A:", " yes", " no")),  # the space goes to the responses
        ("Q: hiA: yes", "Q: hiA: no", ("Q: hiA:", " yes", " no")),
        ("abcX", "abcY", ("abc", "X", "Y")),
        ("X", "Y", ("", "X", "Y")),
        ("Hello", "Hello world", ("Hell", "o", "o world")),  # one contains the other: TRL leaves the last char
        ("same", "same", ("sam", "e", "e")),
        ("", "", ("", "", "")),
        ([U("q"), A("a")], [U("q"), A("b")], ([U("q")], [A("a")], [A("b")])),
        ([S("s"), U("q"), A("a")], [S("s"), U("q"), A("b")], ([S("s"), U("q")], [A("a")], [A("b")])),
        ([U("q1"), A("x"), U("q2"), A("a")], [U("q1"), A("x"), U("q2"), A("b")],
         ([U("q1"), A("x"), U("q2")], [A("a")], [A("b")])),
        ([U("q"), A("a")], [U("q"), A("a")], ([U("q")], [A("a")], [A("a")])),
    ],
)
def test_extract_prompt(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected


def test_extract_prompt_rejects_mixed_types():
    with pytest.raises(TypeError):
        extract_prompt("a", [A("a")])


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "record, fmt, prompt, chosen, rejected, system",
    [
        (GOOD, "standard", "What is 2+2?", "4", "5", None),
        ({**GOOD, "system": "Be brief."}, "standard", "What is 2+2?", "4", "5", "Be brief."),
        ({**GOOD, "system": "  "}, "standard", "What is 2+2?", "4", "5", None),
        ({**GOOD, "system": None}, "standard", "What is 2+2?", "4", "5", None),
        (GOOD_CONV, "conversational", [U("What is 2+2?")], [A("4")], [A("5")], None),
        ({**GOOD_CONV, "prompt": [S("sys"), U("q")]}, "conversational", [S("sys"), U("q")], [A("4")], [A("5")],
         "sys"),
        # a "system" field in a conversational row becomes a leading system message
        ({**GOOD_CONV, "system": "sys"}, "conversational", [S("sys"), U("What is 2+2?")], [A("4")], [A("5")],
         "sys"),
        # UltraFeedback binarized: prompt string, chosen/rejected full conversations, extra fields ignored
        ({"prompt": "q", "prompt_id": "abc", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")],
          "messages": [U("q"), A("good")], "score_chosen": 8.0, "score_rejected": 3.0},
         "conversational", [U("q")], [A("good")], [A("bad")], None),
        # conversational prompt with string responses; string prompt with assistant-only responses
        ({"prompt": [U("q")], "chosen": "a", "rejected": "b"}, "conversational", [U("q")], [A("a")], [A("b")],
         None),
        ({"prompt": "q", "chosen": [A("a")], "rejected": [A("b")]}, "conversational", [U("q")], [A("a")],
         [A("b")], None),
        # implicit prompt
        ({"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go away"},
         "implicit prompt (standard)", "Human: hi Assistant:", " hello", " go away", None),
        ({"chosen": [U("hi"), A("hello")], "rejected": [U("hi"), A("go away")]},
         "implicit prompt (conversational)", [U("hi")], [A("hello")], [A("go away")], None),
        ({"chosen": [S("s"), U("hi"), A("hello")], "rejected": [S("s"), U("hi"), A("go")]},
         "implicit prompt (conversational)", [S("s"), U("hi")], [A("hello")], [A("go")], "s"),
        # text content parts are joined; extra message keys kept, null ones dropped
        ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
          "chosen": [{"role": "assistant", "content": "x", "name": None, "tag": 1}], "rejected": [A("y")]},
         "conversational", [U("ab")], [{"role": "assistant", "content": "x", "tag": 1}], [A("y")], None),
    ],
)
def test_formats(record, fmt, prompt, chosen, rejected, system):
    rows, report = rows_from_records([record], "mem")
    assert report.format == fmt
    assert (report.rows_read, report.rows_skipped, report.problems) == (1, 0, [])
    (row,) = rows
    assert (row.prompt, row.chosen, row.rejected, row.system) == (prompt, chosen, rejected, system)
    assert row.conversational == isinstance(prompt, list)
    assert (row.where, row.index) == ("mem row 0", 0)


def test_input_is_not_modified():
    record = {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")], "system": "s"}
    before = json.dumps(record)
    rows_from_records([record], "mem")
    assert json.dumps(record) == before


# ------------------------------------------------------------------------------------------- malformed rows

MALFORMED = [
    # (case id, line 2 of a JSON-lines file whose line 1 is valid and standard, expected message parts)
    ("missing chosen", {"prompt": "p", "rejected": "r"}, ["missing field 'chosen'", "the row has: prompt, rejected"]),
    ("missing both", {"prompt": "p"}, ["missing fields 'chosen' and 'rejected'"]),
    ("typo in key", {"prompt": "p", "choosen": "c", "rejected": "r"}, ["rename 'choosen' to 'chosen'"]),
    ("sft data", {"messages": [U("q"), A("a")]}, ["missing fields", "chat (SFT) data"]),
    ("number", {"prompt": "p", "chosen": 3, "rejected": "r"}, ["field 'chosen'", "must be a string", "a number (3)"]),
    ("null", {"prompt": None, "chosen": "c", "rejected": "r"}, ["field 'prompt'", "got null", "remove the key"]),
    ("bool", {"prompt": "p", "chosen": "c", "rejected": True}, ["field 'rejected'", "a boolean (true)"]),
    ("dict", {"prompt": "p", "chosen": {"text": "c"}, "rejected": "r"}, ["field 'chosen'", "an object with keys text"]),
    ("empty prompt", {"prompt": "", "chosen": "c", "rejected": "r"}, ["field 'prompt' is empty", "non-empty prompt"]),
    ("blank chosen", {"prompt": "p", "chosen": " \n", "rejected": "r"},
     ["field 'chosen' is empty (or only whitespace)"]),
    ("empty rejected", {"prompt": "p", "chosen": "c", "rejected": ""}, ["field 'rejected' is empty"]),
    ("identical", {"prompt": "p", "chosen": "same", "rejected": "same"}, ["identical", "two different responses"]),
    ("not an object", [1, 2], ["row is a list of 2 items, not an object"]),
    ("string row", "just text", ["row is a string ('just text'), not an object"]),
    ("system type", {**GOOD, "system": 5}, ["field 'system' must be a string", "a number (5)"]),
    ("surrogate", {"prompt": "p\ud800", "chosen": "c", "rejected": "r"}, ["field 'prompt'", "unpaired surrogate"]),
    ("str vs list", {"prompt": "p", "chosen": "c", "rejected": [A("r")]},
     ["'chosen' is a string", "'rejected' is a list of 1 item", "both must be strings"]),
    ("implicit no prefix", {"chosen": "yes", "rejected": "no"}, ["no 'prompt' field", "add a 'prompt' field"]),
    ("implicit no common messages", {"chosen": [U("a"), A("x")], "rejected": [U("b"), A("y")]},
     ["do not begin with common messages"]),
    # conversational problems (they are reported before the format check)
    ("message not object", {"prompt": [U("q")], "chosen": ["hi"], "rejected": [A("r")]},
     ["field 'chosen' message 0 is a string ('hi')", '"role": "user"']),
    ("no role", {"prompt": [{"content": "q"}], "chosen": [A("c")], "rejected": [A("r")]},
     ["field 'prompt' message 0 has no 'role' key (it has: content)"]),
    ("no content", {"prompt": [U("q")], "chosen": [A("c")], "rejected": [{"role": "assistant"}]},
     ["field 'rejected' message 0 has no 'content' key"]),
    ("sharegpt", {"prompt": [{"from": "human", "value": "q"}], "chosen": [A("c")], "rejected": [A("r")]},
     ["no 'role' key", "ShareGPT"]),
    ("bad role", {"prompt": [{"role": "human", "content": "q"}], "chosen": [A("c")], "rejected": [A("r")]},
     ["field 'prompt' message 0 has role 'human'", "system, user, assistant, tool"]),
    ("content number", {"prompt": [U("q")], "chosen": [{"role": "assistant", "content": 7}], "rejected": [A("r")]},
     ["field 'chosen' message 0 'content' must be a string, got a number (7)"]),
    ("image part", {"prompt": [{"role": "user", "content": [{"type": "image"}]}], "chosen": [A("c")],
                    "rejected": [A("r")]}, ["content part that is not text ('image')"]),
    ("no assistant", {"prompt": [U("q")], "chosen": [U("c")], "rejected": [A("r")]},
     ["field 'chosen' has no assistant message"]),
    ("ends with user", {"prompt": [U("q")], "chosen": [A("c")], "rejected": [A("r"), U("more")]},
     ["field 'rejected' ends with a user message", "must end with an assistant message"]),
    ("prompt ends with assistant", {"prompt": [U("q"), A("a")], "chosen": [A("c")], "rejected": [A("r")]},
     ["field 'prompt' ends with an assistant message"]),
    ("empty prompt list", {"prompt": [], "chosen": [A("c")], "rejected": [A("r")]}, ["field 'prompt' is empty"]),
    ("blank assistant", {"prompt": [U("q")], "chosen": [A("  ")], "rejected": [A("r")]}, ["field 'chosen' is empty"]),
    ("identical conv", {"prompt": [U("q")], "chosen": [A("c")], "rejected": [A("c")]}, ["identical"]),
    ("prompt not in conversation", {"prompt": "q", "chosen": [U("other"), A("c")], "rejected": [U("other"), A("r")]},
     ["'prompt' is a string", "give 'prompt' as a list of messages"]),
    ("mixed formats", GOOD_CONV, ["row is conversational (message lists) but line 1 is standard (strings)",
                                  "one format"]),
    # lines that do not parse
    ("invalid json", Raw('{"prompt": "p", "chosen": "c" "rejected": "r"}'),
     ["not valid JSON (Expecting ',' delimiter at column 31)", "one JSON object"]),
    ("truncated json", Raw('{"prompt": "p", "chosen'), ["not valid JSON (Unterminated string"]),
    ("huge int", Raw('{"prompt": "p", "chosen": ' + "9" * 5000 + ', "rejected": "r"}'), ["not valid JSON"]),
    ("deep nesting", Raw("[" * 100000 + "]" * 100000), ["JSON nested too deeply"]),
]


@pytest.mark.parametrize("case, bad, parts", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_row_stops_with_location(tmp_path, case, bad, parts):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad])
    with pytest.raises(PoetError) as info:
        load_rows_from_file(path)
    message = str(info.value)
    assert message.startswith(f"1 invalid row in {path} (of 2 rows):")
    assert f"{path} line 2: " in message
    assert "--skip-invalid" in message
    for part in parts:
        assert part in message

    rows, report = load_rows_from_file(path, skip_invalid=True)
    assert [r.index for r in rows] == [0]
    assert (report.rows_read, report.rows_skipped) == (2, 1)
    assert report.problems[0].startswith(f"{path} line 2: ") and parts[0] in report.problems[0]


def test_non_utf8_line_reports_line_and_byte_offset(tmp_path):
    first = json.dumps(GOOD).encode() + b"\n"
    bad = b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(first + bad)
    with pytest.raises(PoetError) as info:
        load_rows_from_file(path)
    message = str(info.value)
    offset = len(first) + bad.index(b"\xe9")
    assert f"line 2: not valid UTF-8: byte 0xe9 at byte offset {offset} of the file (column 16" in message
    assert "re-encode the file as UTF-8" in message
    rows, report = load_rows_from_file(path, skip_invalid=True)
    assert len(rows) == 1 and report.rows_skipped == 1


def test_many_problems_are_counted_and_five_are_listed(tmp_path):
    rows = [GOOD] + [{"prompt": "p", "chosen": "c"}] * 12
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(PoetError) as info:
        load_rows_from_file(path)
    message = str(info.value)
    assert message.startswith(f"12 invalid rows in {path} (of 13 rows); first 5:")
    assert message.count("\n  - ") == 5
    assert f"{path} line 2:" in message and f"{path} line 6:" in message and f"{path} line 7:" not in message
    assert message.rstrip().endswith("Fix them, or pass --skip-invalid to drop them.")

    kept, report = load_rows_from_file(path, skip_invalid=True)
    assert len(kept) == 1 and report.rows_read == 13 and report.rows_skipped == 12
    assert 1 <= len(report.problems) <= 12 and all("missing field 'rejected'" in p for p in report.problems)


def test_all_rows_invalid_still_raises(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    with pytest.raises(PoetError, match=r"all 2 rows in .* are invalid"):
        load_rows_from_file(path, skip_invalid=True)


def test_mixed_formats_keep_the_majority(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_CONV, GOOD, GOOD_CONV, GOOD_CONV])
    with pytest.raises(PoetError, match=r"line 2: row is standard \(strings\) but line 1 is conversational"):
        load_rows_from_file(path)
    rows, report = load_rows_from_file(path, skip_invalid=True)
    assert [r.index for r in rows] == [0, 2, 3] and report.format == "conversational"


def test_explicit_and_implicit_prompts_may_mix():
    rows, report = rows_from_records([GOOD, {"chosen": "Q? yes", "rejected": "Q? no"}, GOOD], "mem")
    assert [r.prompt for r in rows] == ["What is 2+2?", "Q?", "What is 2+2?"]
    assert report.format == "standard"


# ------------------------------------------------------------------------------------------- files


def test_jsonl_blank_lines_order_and_index(tmp_path):
    path = tmp_path / "data.jsonl"
    a, b, c = ({"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3))
    path.write_text("\n" + json.dumps(a) + "\n  \n" + json.dumps(b) + "\r\n" + json.dumps(c), encoding="utf-8")
    rows, report = load_rows_from_file(path)
    assert [r.prompt for r in rows] == ["p0", "p1", "p2"]
    assert [r.index for r in rows] == [0, 1, 2]
    assert [r.where for r in rows] == [f"{path} line 2", f"{path} line 4", f"{path} line 5"]
    assert (report.format, report.rows_read, report.rows_skipped, report.source) == ("standard", 3, 0, str(path))


def test_jsonl_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    rows, _ = load_rows_from_file(path)
    assert rows[0].prompt == GOOD["prompt"]


@pytest.mark.parametrize("content", [
    json.dumps([GOOD, GOOD]),
    json.dumps({"data": [GOOD, GOOD]}),
    json.dumps({k: [v, v] for k, v in GOOD.items()}),  # a dict of columns
    json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n",  # JSON-lines content in a .json file
    json.dumps([GOOD, GOOD], indent=2),
])
def test_json_file_shapes(tmp_path, content):
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    rows, report = load_rows_from_file(path)
    assert len(rows) == 2 and rows[1].prompt == GOOD["prompt"] and report.format == "standard"
    assert rows[1].index == 1


def test_json_single_object_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD_CONV))
    rows, report = load_rows_from_file(path)
    assert len(rows) == 1 and report.format == "conversational"
    assert rows[0].where == f"{path} row 0"


def test_pretty_json_list_in_jsonl_file_is_accepted(tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    rows, _ = load_rows_from_file(path)
    assert len(rows) == 2


@pytest.mark.parametrize("name, content, parts", [
    ("bad.json", '[{"prompt": "p",\n "chosen": }]',
     ["bad.json is not valid JSON", "Expecting value at line 2 column 12"]),
    ("bad.json", '{"rows": []}', ["expected a list of rows", "an object with keys rows"]),
    ("bad.json", "42", ["expected a list of rows", "a number (42)"]),
    ("empty.json", "[]", ["has no rows"]),
    ("empty.jsonl", "", ["has no rows"]),
    ("blank.jsonl", "\n  \n\n", ["has no rows"]),
    ("data.csv", "prompt,chosen,rejected\n", ["unsupported data file type '.csv'", ".jsonl, .json or .parquet"]),
])
def test_file_level_errors(tmp_path, name, content, parts):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PoetError) as info:
        load_rows_from_file(path)
    for part in parts:
        assert part in str(info.value)


@pytest.mark.parametrize("name, raw, part", [
    ("utf16.jsonl", json.dumps(GOOD).encode("utf-16"), "is UTF-16 encoded"),
    ("nul.jsonl", b'{"a": 1}\x00\x00', "contains NUL bytes"),
    ("latin1.json", b'[{"prompt": "\xe9"}]', "not valid UTF-8: byte 0xe9 on line 1 (byte offset 13"),
])
def test_encoding_errors(tmp_path, name, raw, part):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(PoetError, match="UTF-8") as info:
        load_rows_from_file(path)
    assert part in str(info.value)


def test_parquet_file_named_jsonl(tmp_path):
    write_parquet(tmp_path / "x.parquet", [GOOD])
    path = tmp_path / "x.jsonl"
    path.write_bytes((tmp_path / "x.parquet").read_bytes())
    with pytest.raises(PoetError, match="is a Parquet file; rename it"):
        load_rows_from_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(PoetError, match="data file not found"):
        load_rows_from_file(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("rows, fmt", [
    ([GOOD, {**GOOD, "prompt": "other"}], "standard"),
    ([GOOD_CONV, GOOD_CONV], "conversational"),
    ([{"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "score_chosen": 1.0}] * 2,
     "conversational"),
])
def test_parquet(tmp_path, rows, fmt):
    path = write_parquet(tmp_path / "data.parquet", rows)
    loaded, report = load_rows_from_file(path)
    assert report.format == fmt and len(loaded) == 2
    assert loaded[1].where == f"{path} row 1"
    assert isinstance(loaded[0].chosen, str) == (fmt == "standard")


def test_parquet_validation_and_corrupt_file(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", [GOOD, {**GOOD, "chosen": "  "}])
    with pytest.raises(PoetError, match=r"data.parquet row 1: field 'chosen' is empty"):
        load_rows_from_file(path)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(PoetError, match="could not read Parquet file"):
        load_rows_from_file(bad)


# ------------------------------------------------------------------------------------------- load_split


def test_single_file_is_train_only(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    cfg = DataConfig(data=str(path))
    rows, report = load_split(cfg, "train")
    assert len(rows) == 1
    for split in ("valid", "test"):
        rows, report = load_split(cfg, split)
        assert rows == [] and report.format == "none" and report.rows_read == 0 and report.notes


def test_folder_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    write_parquet(tmp_path / "validation.parquet", [GOOD_CONV])
    (tmp_path / "test.json").write_text(json.dumps([GOOD] * 3))
    cfg = DataConfig(data=str(tmp_path))
    assert [len(load_split(cfg, s)[0]) for s in ("train", "valid", "test")] == [2, 1, 3]
    rows, report = load_split(cfg, "valid")
    assert report.source == str(tmp_path / "validation.parquet") and rows[0].conversational


def test_folder_without_optional_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    cfg = DataConfig(data=str(tmp_path))
    assert load_split(cfg, "valid")[0] == [] and load_split(cfg, "test")[0] == []
    with pytest.raises(PoetError, match=r"has no valid file: expected one of dev.jsonl"):
        load_split(DataConfig(data=str(tmp_path), valid_split="dev"), "valid")


def test_folder_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PoetError, match=r"has no train file: expected one of train.jsonl, train.json, "
                                        r"train.parquet \(it contains: notes.txt\)"):
        load_split(DataConfig(data=str(tmp_path)), "train")
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    write_jsonl(tmp_path / "train.json", [GOOD])
    with pytest.raises(PoetError, match=r"several files for the train split \(train.jsonl, train.json\)"):
        load_split(DataConfig(data=str(tmp_path)), "train")


@pytest.mark.parametrize("data", ["data/missing.jsonl", "./missing", "missing.parquet", "/no/such/dir",
                                  "a/b/c"])
def test_missing_local_path(data):
    with pytest.raises(PoetError, match=f"data file not found: {data}"):
        load_split(DataConfig(data=data), "train")


def test_no_data():
    with pytest.raises(PoetError, match="pass --data"):
        load_split(DataConfig(), "train")


def test_system_prompt_from_config(tmp_path):
    rows = [GOOD, {**GOOD, "system": "own"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    loaded, _ = load_split(DataConfig(data=str(path), system_prompt="cfg"), "train")
    assert [r.system for r in loaded] == ["cfg", "own"]
    assert loaded[0].prompt == GOOD["prompt"]

    conv = [GOOD_CONV, {**GOOD_CONV, "prompt": [S("own"), U("q")]}]
    path = write_jsonl(tmp_path / "c.jsonl", conv)
    loaded, _ = load_split(DataConfig(data=str(path), system_prompt="cfg"), "train")
    assert loaded[0].prompt == [S("cfg"), U("What is 2+2?")] and loaded[0].system == "cfg"
    assert loaded[1].prompt == [S("own"), U("q")] and loaded[1].system == "own"
    loaded, _ = load_split(DataConfig(data=str(path)), "train")
    assert loaded[0].prompt == [U("What is 2+2?")] and loaded[0].system is None


def test_skip_invalid_from_config(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "p"}])
    with pytest.raises(PoetError):
        load_split(DataConfig(data=str(path)), "train")
    rows, report = load_split(DataConfig(data=str(path), skip_invalid=True), "train")
    assert len(rows) == 1 and report.rows_skipped == 1


# ------------------------------------------------------------------------------------------- hub (mocked)


class FakeHub:
    """Stands in for datasets.get_dataset_split_names / load_dataset; records what was asked."""

    def __init__(self, splits, error=None):
        self.splits, self.error, self.calls = splits, error, []

    def split_names(self, repo, config_name=None, **kw):
        if self.error:
            raise self.error
        self.calls.append(("names", repo, config_name))
        return list(self.splits)

    def load(self, repo, name=None, split=None, **kw):
        self.calls.append(("load", repo, name, split))
        base = split.split("[")[0]
        rows = self.splits[base]
        return rows[:2] if "[:2]" in split else rows


@pytest.fixture
def hub(monkeypatch):
    import datasets

    def install(splits, error=None):
        fake = FakeHub(splits, error)
        monkeypatch.setattr(datasets, "get_dataset_split_names", fake.split_names)
        monkeypatch.setattr(datasets, "load_dataset", fake.load)
        return fake

    return install


def test_hub_train_and_valid(hub):
    fake = hub({"train": [GOOD] * 3, "validation": [GOOD], "test": [GOOD] * 2})
    cfg = DataConfig(data="org/prefs", data_config="default")
    rows, report = load_split(cfg, "train")
    assert len(rows) == 3 and rows[2].where == "hub dataset org/prefs (config default) split train row 2"
    assert ("load", "org/prefs", "default", "train") in fake.calls
    rows, report = load_split(cfg, "valid")
    assert len(rows) == 1 and report.source.endswith("split validation") and report.notes == []
    assert len(load_split(cfg, "test")[0]) == 2


def test_hub_ultrafeedback_splits(hub):
    uf_row = {"prompt": "q", "prompt_id": "1", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")],
              "messages": [U("q"), A("a")], "score_chosen": 9.0, "score_rejected": 2.0}
    hub({"train_prefs": [uf_row] * 2, "test_prefs": [uf_row], "train_sft": [], "test_sft": []})
    cfg = DataConfig(data="HuggingFaceH4/ultrafeedback_binarized")
    rows, report = load_split(cfg, "train")
    assert len(rows) == 2 and report.format == "conversational"
    assert rows[0].prompt == [U("q")] and rows[0].chosen == [A("a")]
    assert any("using 'train_prefs'" in n for n in report.notes)
    assert report.source.endswith("split train_prefs")
    rows, report = load_split(cfg, "valid")
    assert len(rows) == 1 and any("validating on 'test_prefs'" in n for n in report.notes)


def test_hub_split_choices(hub):
    fake = hub({"train": [GOOD] * 5, "dev": [GOOD]})
    rows, report = load_split(DataConfig(data="o/n"), "valid")
    assert rows == [] and report.format == "none" and "no valid split (it has: train, dev)" in report.notes[0]
    assert len(load_split(DataConfig(data="o/n", valid_split="dev"), "valid")[0]) == 1
    assert len(load_split(DataConfig(data="o/n", train_split="train[:2]"), "train")[0]) == 2
    with pytest.raises(PoetError, match=r"has no split 'prefs' \(it has: train, dev\); pass --train-split"):
        load_split(DataConfig(data="o/n", train_split="prefs"), "train")
    with pytest.raises(PoetError, match=r"has no split 'val'.*--valid-split"):
        load_split(DataConfig(data="o/n", valid_split="val"), "valid")
    assert not any(c[0] == "load" and c[3] == "prefs" for c in fake.calls)


def test_hub_rows_are_validated(hub):
    hub({"train": [GOOD, {"prompt": "p", "chosen": 1, "rejected": "r"}]})
    with pytest.raises(PoetError, match=r"hub dataset o/n split train row 1: field 'chosen'"):
        load_split(DataConfig(data="o/n"), "train")


@pytest.mark.parametrize("error, part", [
    (ConnectionError("Couldn't reach 'o/n' on the Hub (LocalEntryNotFoundError)"),
     "Couldn't reach 'o/n' on the Hub (LocalEntryNotFoundError)"),
    (ValueError("Config name is missing.\nPlease pick one among the available configs: ['a', 'b']"),
     "Config name is missing. Check"),
    (RuntimeError(""), "RuntimeError"),
])
def test_hub_failure_message(hub, error, part):
    hub({}, error=error)
    with pytest.raises(PoetError) as info:
        load_split(DataConfig(data="o/n"), "train")
    message = str(info.value)
    assert message.startswith("could not load dataset 'o/n' from the Hugging Face hub: ")
    assert part in message
    assert "Check the id and your network, or pass a local .jsonl/.json/.parquet file or a folder" in message
    assert ("--data-config" in message) == ("Config" in part)


def test_hub_offline_for_real():
    """The real `datasets` with HF_HUB_OFFLINE=1 and an id that is in no cache: a clear PoetError, quickly."""
    code = ("from poet_mlx.config import DataConfig\nfrom poet_mlx.data.sources import load_split\n"
            "from poet_mlx.errors import PoetError\n"
            "try:\n    load_split(DataConfig(data='nobody/nothing'), 'train')\n"
            "except PoetError as e:\n    print('POET', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert "POET could not load dataset 'nobody/nothing' from the Hugging Face hub:" in out.stdout, out.stderr
    assert "Check the id and your network" in out.stdout


def test_import_is_light():
    code = "import sys, poet_mlx.data.sources; print(sorted({'datasets', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stderr


# ------------------------------------------------------------------------------------------- fuzz

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                            "content": st.text(max_size=6) | _scalars}), max_size=3)
_values = st.recursive(_scalars | _messages, lambda c: st.lists(c, max_size=3) |
                       st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=8)
_words = st.text(alphabet="abcd \n", max_size=6)


def _conv(roles):
    return st.lists(st.fixed_dictionaries({"role": st.sampled_from(roles), "content": _words}), min_size=1,
                    max_size=3)


# mostly well-formed rows, so that the fuzz reaches every check, with arbitrary values mixed in
_prompt = _words | _conv(["user", "system"]) | _conv(["user", "assistant"])
_response = _words | _conv(["assistant"]) | _conv(["user", "assistant"])
_near_rows = st.fixed_dictionaries({"chosen": _response, "rejected": _response},
                                   optional={"prompt": _prompt, "system": st.none() | _words, "extra": _values})
_valid_rows = st.builds(lambda p, c, r, conv: {"prompt": [U(p)], "chosen": [A(c)], "rejected": [A(r)]} if conv
                        else {"prompt": p, "chosen": c, "rejected": r},
                        _words.map("q".__add__), _words.map("a".__add__), _words.map("b".__add__), st.booleans())
_keys = st.sampled_from(["prompt", "chosen", "rejected", "system", "extra"])
_rows = _valid_rows | _near_rows | st.dictionaries(_keys, _values | _words | _messages, max_size=5) | _values


def _check_row(row: PreferenceRow):
    def blank(t):
        return not t.strip() if isinstance(t, str) else all(not m["content"].strip() for m in t)

    assert row.chosen != row.rejected
    for text in (row.prompt, row.chosen, row.rejected):
        assert isinstance(text, list) == row.conversational and not blank(text)
    if row.conversational:
        assert row.chosen[-1]["role"] == row.rejected[-1]["role"] == "assistant"
        assert row.prompt[-1]["role"] != "assistant"


@settings(max_examples=300, deadline=None)
@given(records=st.lists(_rows, max_size=6), skip=st.booleans())
def test_fuzz_records(records, skip):
    try:
        rows, report = rows_from_records(records, "fuzz", skip_invalid=skip)
    except PoetError:
        return
    assert isinstance(report, LoadReport) and report.rows_read == len(records)
    assert len(rows) + report.rows_skipped == len(records)
    assert [r.index for r in rows] == sorted(r.index for r in rows)
    for row in rows:
        _check_row(row)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(_rows.map(lambda r: json.dumps(r).encode()), st.binary(max_size=20),
                                st.just(json.dumps(GOOD).encode())), max_size=6),
       suffix=st.sampled_from([".jsonl", ".json"]), skip=st.booleans())
def test_fuzz_files(lines, suffix, skip):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(b"\n".join(lines))
        try:
            rows, report = load_rows_from_file(path, skip_invalid=skip)
        except PoetError:
            return
        for row in rows:
            _check_row(row)

"""Every user mistake of issue 6, through the real CLI in process: exit code 2, one `error: ...` line on
stderr that names what, where and the fix, no traceback, and nothing written to the run folder.

Each case builds its input, runs `poet-mlx train ...` (or `data check`), and lists fragments the one line
must contain. The README's error table is this list.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import cli, one_error_line

GOOD = {"prompt": "Name a color.", "chosen": "Blue is a color.", "rejected": "No."}
CONV = {"prompt": [{"role": "user", "content": "Name a color."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "No."}]}


def flags(model, data, run) -> list:
    return ["--model", model, "--data", data, "--adapter-path", run, "--iters", 1, "--num-layers", -1,
            "--rank", 4, "--batch-size", 2, "--max-length", 64, "--max-prompt-length", 32, "--steps-per-eval", 0,
            "--save-every", 0, "--quiet"]


def jsonl(path: Path, *rows, raw: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return path


def good_rows(n: int = 4) -> list:
    return [{"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": f"Bad {i}."} for i in range(n)]


def fake_run_folder(run: Path) -> Path:
    """A folder that holds a (different) run: adapters and a checkpoint folder."""
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    (run / "adapters.safetensors").write_bytes(b"weights of another run")
    (run / "adapter_config.json").write_text("{}")
    return run


# Each case: (id, build) where build(ctx) returns (extra argv or full argv, fragments of the error line).
# ctx: tmp (Path), model, data (the fixtures), run (the --adapter-path), monkeypatch.


def _data_case(rows=(), raw=b"", extra=()):
    def build(ctx):
        return flags(ctx.model, jsonl(ctx.tmp / "data.jsonl", *rows, raw=raw), ctx.run) + list(extra)
    return build


def _unreadable(ctx):
    path = jsonl(ctx.tmp / "data.jsonl", *good_rows())
    real = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    ctx.monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return flags(ctx.model, path, ctx.run)


def _huge_line(ctx):
    from poet_mlx.data.sources import MAX_LINE_BYTES

    big = json.dumps({**GOOD, "chosen": "x" * (MAX_LINE_BYTES + 1)}).encode() + b"\n"
    return flags(ctx.model, jsonl(ctx.tmp / "data.jsonl", *good_rows(), raw=big), ctx.run)


def _model_folder(kind):
    def build(ctx):
        folder = ctx.tmp / "not-a-model"
        folder.mkdir()
        if kind != "empty":
            (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        if kind == "corrupt":
            (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
        return flags(folder, jsonl(ctx.tmp / "data.jsonl", *good_rows()), ctx.run)
    return build


def _no_chat_template(ctx):
    model = ctx.tmp / "model-without-template"
    shutil.copytree(ctx.model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model.glob("chat_template.*"):
        extra.unlink()
    return flags(model, jsonl(ctx.tmp / "data.jsonl", CONV, {**CONV, "chosen": [{"role": "assistant",
                                                                                "content": "Red."}]}), ctx.run)


def _yaml(text):
    def build(ctx):
        path = ctx.tmp / "run.yaml"
        path.write_text(text.format(model=ctx.model, data=ctx.data))
        return ["train", "-c", path, "--adapter-path", ctx.run, "--quiet"]
    return build


def _flag(*extra):
    def build(ctx):
        return flags(ctx.model, ctx.data, ctx.run) + list(extra)
    return build


def _holds_run(ctx):
    fake_run_folder(ctx.run)
    return flags(ctx.model, ctx.data, ctx.run)


def _overwrite_with_bad_data(ctx):
    fake_run_folder(ctx.run)
    return flags(ctx.model, jsonl(ctx.tmp / "data.jsonl", {"prompt": "p"}), ctx.run) + ["--overwrite"]


def _resume_unfinished(ctx):
    from poet_mlx.config import RunConfig

    ctx.run.mkdir()
    flat = RunConfig.from_flat({"model": str(ctx.model), "data": str(ctx.data)}).to_flat()
    (ctx.run / "adapter_config.json").write_text(json.dumps({"poet_mlx": {"config": flat}}))
    (ctx.run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    return ["train", "--adapter-path", ctx.run, "--resume", "--quiet"]


def _run_is_a_file(ctx):
    ctx.run.write_text("not a folder")
    return flags(ctx.model, ctx.data, ctx.run)


def _folder_without_train(ctx):
    folder = ctx.tmp / "folder"
    folder.mkdir()
    jsonl(folder / "valid.jsonl", *good_rows())
    return flags(ctx.model, folder, ctx.run)


SAME_START = [{"prompt": f"Q{i}?", "chosen": "Well, let me think about this one: yes.",
               "rejected": f"Well, let me think about this one: no {i}."} for i in range(3)]
CASES = [
    ("missing file", lambda c: flags(c.model, c.tmp / "missing.jsonl", c.run),
     ["data file not found", "missing.jsonl"]),
    ("unreadable file", _unreadable, ["could not read", "data.jsonl", "Permission denied"]),
    ("invalid json", _data_case(good_rows(), b'{"prompt": "p", "chosen": "c" "rejected": "r"}\n'),
     ["1 invalid row", "data.jsonl line 5", "not valid JSON", "--skip-invalid"]),
    ("missing field", _data_case(good_rows() + [{"prompt": "p", "chosen": "c"}]),
     ["line 5", "missing field 'rejected'", "--skip-invalid"]),
    ("number", _data_case(good_rows() + [{**GOOD, "chosen": 3}]), ["line 5", "field 'chosen' must be a string",
                                                                  "a number (3)"]),
    ("null", _data_case(good_rows() + [{**GOOD, "rejected": None}]), ["field 'rejected'", "got null"]),
    ("nested", _data_case(good_rows() + [{**GOOD, "prompt": {"text": "p"}}]), ["field 'prompt'",
                                                                             "an object with keys text"]),
    ("empty prompt", _data_case(good_rows() + [{**GOOD, "prompt": ""}]), ["line 5", "field 'prompt' is empty"]),
    ("empty chosen", _data_case(good_rows() + [{**GOOD, "chosen": "  "}]), ["field 'chosen' is empty"]),
    ("empty rejected", _data_case(good_rows() + [{**GOOD, "rejected": ""}]), ["field 'rejected' is empty"]),
    ("chosen == rejected", _data_case(good_rows() + [{**GOOD, "rejected": GOOD["chosen"]}]),
     ["'chosen' and 'rejected' are identical"]),
    ("wrong role", _data_case([CONV, {**CONV, "prompt": [{"role": "human", "content": "q"}]}]),
     ["line 2", "has role 'human'", "system, user, assistant, tool"]),
    ("no assistant turn", _data_case([CONV, {**CONV, "chosen": [{"role": "user", "content": "q"}]}]),
     ["line 2", "field 'chosen' has no assistant message"]),
    ("mixed formats", _data_case(good_rows() + [CONV]), ["line 5", "row is conversational", "one format"]),
    ("non-utf8", _data_case(good_rows(), b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n'),
     ["line 5", "not valid UTF-8", "byte 0xe9", "re-encode the file as UTF-8"]),
    ("huge line", _huge_line, ["line 5", "line too long", "16 MB", "one row per line"]),
    ("empty file", _data_case(), ["has no rows"]),
    ("blank lines only", _data_case(raw=b"\n \n\n"), ["has no rows"]),
    ("all rows invalid", _data_case([{"prompt": "p"}, {"chosen": "c"}]), ["all 2 rows", "are invalid"]),
    ("all pairs cut to identical", _data_case(SAME_START, extra=["--max-length", 8, "--max-prompt-length", 4]),
     ["all 3 train pairs were dropped by the length limits", "identical after the max_length cut",
      "raise --max-length (now 8)"]),
    ("hub dataset offline", lambda c: flags(c.model, "someone/no-such-dataset", c.run),
     ["could not load dataset 'someone/no-such-dataset'", "Hugging Face hub", "local .jsonl"]),
    ("hub model offline", lambda c: flags("mlx-community/no-such-model-4bit", c.data, c.run),
     ["could not get model 'mlx-community/no-such-model-4bit'", "Hugging Face hub", "local model folder"]),
    ("model folder: empty", _model_folder("empty"), ["has no config.json", "not an mlx-lm/Hugging Face model"]),
    ("model folder: no weights", _model_folder("config"), ["has no *.safetensors weights"]),
    ("model folder: corrupt weights", _model_folder("corrupt"), ["mlx-lm could not load the model", "re-download"]),
    ("no chat template", _no_chat_template, ["line 1", "conversational rows need a chat template"]),
    ("yaml typo", _yaml("model: {model}\ndata: {data}\nlearning_rat: 1.0e-5\n"),
     ["unknown key 'learning_rat'", "did you mean 'learning_rate'", "run.yaml"]),
    ("yaml syntax", _yaml("model: {model}\ndata: [unclosed\n"), ["run.yaml line", "not valid YAML"]),
    ("beta 0", _flag("--beta", 0), ["'beta' must be > 0"]),
    ("beta < 0", _flag("--beta", -0.1), ["'beta' must be > 0", "-0.1"]),
    ("rank 0", _flag("--rank", 0), ["'rank' must be > 0"]),
    ("poet ratio 0", _flag("--poet-ratio", 0), ["'poet_ratio' must be in (0, 1]"]),
    ("poet ratio > 1", _flag("--poet-ratio", 1.5), ["'poet_ratio' must be in (0, 1]", "1.5"]),
    ("learning rate 0", _flag("--learning-rate", 0), ["'learning_rate' must be > 0"]),
    ("learning rate < 0", _flag("--learning-rate=-1e-05"), ["'learning_rate' must be > 0"]),
    ("folder holds another run", _holds_run, ["already holds a training run", "--resume", "--overwrite"]),
    ("overwrite with bad data", _overwrite_with_bad_data, ["the only row", "is invalid", "missing fields"]),
    ("resume before any checkpoint", _resume_unfinished, ["nothing to resume", "before its first checkpoint",
                                                          "without --resume"]),
    ("adapter path is a file", _run_is_a_file, ["is a file", "pass a folder"]),
    ("folder without train file", _folder_without_train, ["has no train file", "train.jsonl"]),
]


class Ctx:
    def __init__(self, tmp, model, data, monkeypatch):
        self.tmp, self.model, self.data, self.monkeypatch = tmp, Path(model), Path(data), monkeypatch
        self.run = tmp / "run"


def _snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize("case, build, fragments", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_gets_one_line_and_writes_nothing(case, build, fragments, tiny_model_dir, tiny_data_dir,
                                                       tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch)
    argv = build(ctx)
    argv = argv if argv[0] == "train" else ["train"] + argv
    before = _snapshot(ctx.run)
    assert cli(*argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in: {line}"
    assert _snapshot(ctx.run) == before, "a refused or failed start must leave the run folder as it was"


def test_debug_shows_the_traceback_and_the_full_message(tmp_path, tiny_model_dir, capsys):
    data = jsonl(tmp_path / "data.jsonl", *good_rows(), {"prompt": "p"}, {"prompt": "q"})
    assert cli("train", *flags(tiny_model_dir, data, tmp_path / "run"), "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "PoetError" in err
    assert "\n  - " in err  # the row list as written, one row per line


def test_many_invalid_rows_count_and_list_the_first_five_on_one_line(tmp_path, tiny_model_dir, capsys):
    data = jsonl(tmp_path / "data.jsonl", *good_rows(), *[{"prompt": "p", "chosen": f"c{i}"} for i in range(9)])
    assert cli("train", *flags(tiny_model_dir, data, tmp_path / "run")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "9 invalid rows" in line and "(of 13 rows); first 5:" in line
    assert line.count("missing field 'rejected'") == 5 and "line 9:" in line and "line 10:" not in line
    assert line.endswith("Fix them, or pass --skip-invalid to drop them.")


def test_skip_invalid_drops_rows_with_a_count(tmp_path, tiny_model_dir, capsys):
    """The same bad rows train with --skip-invalid; the run header counts what was dropped."""
    data = jsonl(tmp_path / "data.jsonl", *good_rows(4), {"prompt": "p", "chosen": "c"}, {**GOOD, "chosen": 3})
    argv = flags(tiny_model_dir, data, tmp_path / "run")
    argv.remove("--quiet")
    assert cli("train", *argv, "--skip-invalid", "--loss", "simpo", "--plain") == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("run "))
    assert "rows_skipped=2" in header and "train_pairs=4" in header

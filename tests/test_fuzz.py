"""Fuzzing malformed rows and files through the real CLI entry (`poet_mlx.cli.main.main`).

Whatever the file holds, `poet-mlx data check` and `poet-mlx train` end in a clear error (exit 2, every
stderr line `error: ...`, no traceback) or in a counted skip; and the two commands agree on whether the data
is acceptable. `train` runs against a model folder with corrupt weights, so an accepted dataset ends at the
model load (a known one-line error) instead of a training run: the fuzz stays fast and still goes through
the whole data path of `train`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from poet_mlx.cli.main import main

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

_text = st.text(alphabet="ab \n\u00e9\u4e2d", max_size=5)
_scalar = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | _text
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "human"]),
                                  "content": _text | _scalar}, optional={"from": _text})
_messages = st.lists(_message, max_size=3)
_value = st.recursive(_scalar | _messages, lambda c: st.lists(c, max_size=2) | st.dictionaries(_text, c, max_size=2),
                      max_leaves=5)
_good = st.builds(lambda p, c, r, conv: {"prompt": [U(p)], "chosen": [A(c)], "rejected": [A(r)]} if conv else
                  {"prompt": p, "chosen": c, "rejected": r},
                  _text.map("q".__add__), _text.map("a".__add__), _text.map("b".__add__), st.booleans())
_near = st.fixed_dictionaries({"chosen": _text | _messages | _scalar, "rejected": _text | _messages | _scalar},
                              optional={"prompt": _text | _messages | _scalar, "system": _scalar})
_row = _good | _good | _near | st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "x"]), _value,
                                               max_size=4) | _value
_line = (_row.map(lambda r: json.dumps(r).encode()) | st.binary(max_size=12)
         | st.sampled_from([b"", b"   ", b"\xff\xfe{}", b'{"prompt": "p", "chosen": "c"', b"\xef\xbb\xbf{}",
                            b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}']))
_file = st.tuples(st.lists(_line, max_size=6), st.sampled_from([".jsonl", ".json"]))


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory) -> Path:
    """Passes the cheap local checks (config.json, *.safetensors) but fails to load: one known error."""
    folder = tmp_path_factory.mktemp("broken_model")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse only; the fuzzed content never reaches it
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_clean_errors(err: str) -> list[str]:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    return lines


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(content=_file, skip=st.booleans())
def test_fuzz_data_check_and_train_agree_and_never_crash(content, skip, broken_model, capsys):
    lines, suffix = content
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"data{suffix}"
        data.write_bytes(b"\n".join(lines))
        skip_flag = ["--skip-invalid"] if skip else []

        rc, out, err = run_cli(capsys, "data", "check", data, "--json", *skip_flag)
        assert rc in (0, 2)
        if rc == 0:
            assert err == ""
            train = json.loads(out)["splits"]["train"]
            assert train["valid_rows"] + train["invalid_rows"] == train["rows"] and train["valid_rows"] > 0
            assert skip or train["invalid_rows"] == 0  # invalid rows pass only as a counted skip
            assert sum(train["problem_kinds"].values()) == train["invalid_rows"]
        else:
            assert_clean_errors(err)
        accepted = rc == 0
        event(f"accepted={accepted} skip={skip}")

        run = Path(tmp) / "run"
        rc, out, err = run_cli(capsys, "train", "--model", broken_model, "--data", data, "--adapter-path", run,
                               "--quiet", *skip_flag)
        assert rc == 2
        [line] = assert_clean_errors(err)
        reached_model = line.startswith(f"error: mlx-lm could not load the model in {broken_model}")
        assert reached_model == accepted, line
        assert not run.exists(), "a failed start writes nothing"

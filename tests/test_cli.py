"""The `poet-mlx` command line, in process (`main(argv)`) on the tiny model, plus two subprocess checks.

User mistakes must end in exit code 2 with one `error: ...` line on stderr and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, one_error_line

from poet_mlx.train.checkpoint import read_metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# A value is bare, or a JSON string in double quotes when it holds a space, a quote or '=' (logfmt).
PLAIN_PAIR = r'[^\s="]+=(?:"(?:[^"\\]|\\.)*"|[^\s"]*)'
PLAIN_LINE = re.compile(rf"^(?P<kind>[a-z]+)(?P<pairs>(?: {PLAIN_PAIR})*)$")
PLAIN_KINDS = {"phase", "run", "train", "eval", "checkpoint", "done"}


def tiny_flags(model_dir, data_dir, run_dir, iters: int = 2) -> list:
    """Flags for a run of a few seconds on the tiny fixtures."""
    return ["--model", model_dir, "--data", data_dir, "--adapter-path", run_dir, "--iters", iters,
            "--num-layers", -1, "--rank", 4, "--batch-size", 4, "--max-length", 128, "--max-prompt-length", 32,
            "--learning-rate", 1e-3, "--steps-per-report", 1, "--steps-per-eval", 0, "--save-every", 0]


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """A finished 2-step run (shared read-only by the tests that only read it)."""
    root = tmp_path_factory.mktemp("cli_run")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the per-test isolated_cache is not active yet
        mp.setenv("POET_MLX_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert cli("train", *tiny_flags(tiny_model_dir, tiny_data_dir, root / "run"), "--quiet") == 0
    return root / "run"


# ---------------------------------------------------------------------------------------------- dispatch


def test_help_lists_the_commands(capsys):
    assert cli("--help") == 0
    out = capsys.readouterr().out
    for name in ("train", "eval", "demo"):
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), out
    assert cli() == 0 and "commands:" in capsys.readouterr().out


def test_unknown_command_exits_2(capsys):
    assert cli("trian") == 2
    captured = capsys.readouterr()
    assert "unknown command 'trian'" in captured.err and "train" in captured.err
    assert captured.out == ""


def test_version(capsys):
    from poet_mlx import __version__

    assert cli("--version") == 0 and capsys.readouterr().out.strip() == __version__


def test_train_help_shows_the_generated_flags(capsys):
    assert cli("train", "--help") == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--model", "--data", "--loss", "--beta", "--poet", "--no-poet", "--poet-ratio",
                 "--gamma-beta-ratio", "--rank", "--num-layers", "--learning-rate", "--batch-size",
                 "--grad-accumulation-steps", "--max-length", "--max-prompt-length", "--adapter-path",
                 "--resume", "--overwrite", "--plain", "--quiet"):
        assert flag in out, flag
    assert "dpo" in out and "simpo" in out  # loss choices


def test_eval_help(capsys):
    assert cli("eval", "--help") == 0
    out = capsys.readouterr().out
    assert "--adapter-path" in out and "--output" in out and "--learning-rate" not in out


def test_bad_flag_value_exits_2(capsys):
    assert cli("train", "--beta", "high") == 2
    assert "--beta" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- train


def test_train_plain_from_example_yaml_with_flag_overrides(tiny_model_dir, tiny_data_dir, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    run = tmp_path / "run"
    rc = cli("train", "-c", EXAMPLES / "tiny_local.yaml", *tiny_flags(tiny_model_dir, tiny_data_dir, run),
             "--steps-per-eval", 2, "--plain")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "\x1b" not in out, "plain output must not contain ANSI escapes"
    lines = out.splitlines()
    done_at = next(i for i, line in enumerate(lines) if line.startswith("done "))
    records = []
    for line in lines[: done_at + 1]:
        m = PLAIN_LINE.match(line)
        assert m, f"not a 'KIND key=value ...' line: {line!r}"
        assert m["kind"] in PLAIN_KINDS, line
        pairs = (p.split("=", 1) for p in re.findall(PLAIN_PAIR, m["pairs"]))
        records.append((m["kind"], {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}))
    kinds = [k for k, _ in records]
    assert kinds.index("run") < kinds.index("train") < kinds.index("done")
    header = next(r for k, r in records if k == "run")
    assert header["poet"] == "True" and header["loss"] == "dpo"  # from the YAML
    assert header["rank"] == "4" and header["num_layers"] == "2"  # flags override the YAML (rank 8); -1: all 2
    train = [r for k, r in records if k == "train"]
    assert [int(r["step"]) for r in train] == [1, 2]
    assert all(float(r["loss"]) > 0 and float(r["grad_norm"]) > 0 for r in train)
    assert [int(r["step"]) for k, r in records if k == "eval"] == [0, 2]
    done = next(r for k, r in records if k == "done")
    assert done["steps"] == "2" and done["interrupted"] == "False"
    assert train_steps(run) == [1, 2]
    assert (run / "adapters.safetensors").is_file()


def test_yaml_typo_exits_2_with_one_error_line(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(f"model: {tiny_model_dir}\ndata: {tiny_data_dir}\nlearning_rat: 1.0e-5\n")
    assert cli("train", "-c", path, "--adapter-path", tmp_path / "run") == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "learning_rat" in line and "did you mean 'learning_rate'" in line and str(path) in line
    assert not (tmp_path / "run").exists(), "nothing may be written before the settings are valid"


def test_out_of_range_flag_exits_2_naming_the_key(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    assert cli("train", *tiny_flags(tiny_model_dir, tiny_data_dir, tmp_path / "run"), "--poet-ratio", 1.5) == 2
    assert "'poet_ratio' must be in (0, 1]" in one_error_line(capsys.readouterr().err)


def test_missing_data_file_exits_2(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli("train", *tiny_flags(tiny_model_dir, missing, tmp_path / "run"), "--quiet") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not found" in line and str(missing) in line


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli("train", "-c", tmp_path / "nope.yaml") == 2
    assert "config file not found" in one_error_line(capsys.readouterr().err)


def test_unknown_hub_model_offline_exits_2_mentioning_the_hub(tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "huggingface_hub" in sys.modules:  # it reads HF_HUB_OFFLINE once, when first imported
        monkeypatch.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
    rc = cli("train", *tiny_flags("mlx-community/definitely-not-here-4bit", tiny_data_dir, tmp_path / "run"),
             "--quiet")
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "definitely-not-here-4bit" in line and "hub" in line.lower()


def test_second_train_into_the_same_folder_needs_resume_or_overwrite(finished_run, tiny_model_dir,
                                                                     tiny_data_dir, capsys):
    before = (finished_run / "metrics.jsonl").read_text()
    assert cli("train", *tiny_flags(tiny_model_dir, tiny_data_dir, finished_run), "--quiet") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--resume" in line and "--overwrite" in line
    assert (finished_run / "metrics.jsonl").read_text() == before, "the refused run must leave the folder alone"


def test_resume_with_more_iters_continues(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", *tiny_flags(tiny_model_dir, tiny_data_dir, run, iters=2), "--quiet") == 0
    assert train_steps(run) == [1, 2]
    # Settings come from the run folder; a conflicting one is refused, iters may grow.
    assert cli("train", "--adapter-path", run, "--resume", "--iters", 4, "--rank", 8, "--quiet") == 2
    assert "rank" in one_error_line(capsys.readouterr().err)
    assert cli("train", "--adapter-path", run, "--resume", "--iters", 4, "--quiet") == 0
    assert train_steps(run) == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_exits_2(tmp_path, capsys):
    assert cli("train", "--adapter-path", tmp_path / "empty", "--resume") == 2
    assert "not a poet-mlx run folder" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- eval


def test_eval_writes_one_json_line_per_pair(finished_run, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    data = Path(tiny_data_dir) / "valid.jsonl"
    n_pairs = len(data.read_text().splitlines())
    out = tmp_path / "per_pair.jsonl"
    rc = cli("eval", "--model", tiny_model_dir, "--data", data, "--adapter-path", finished_run, "--output", out)
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == n_pairs
    assert [r["index"] for r in rows] == list(range(n_pairs))
    for r in rows:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"} <= set(r)
        assert r["rewards/accuracies"] in (0.0, 1.0)
    assert "rewards/accuracies" in capsys.readouterr().out


def test_eval_of_a_missing_run_folder_exits_2(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    rc = cli("eval", "--model", tiny_model_dir, "--data", tiny_data_dir, "--adapter-path", tmp_path / "nope")
    assert rc == 2
    one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- outside


def test_python_api_example_runs(tmp_path):
    """examples/python_api.py as a user runs it: it trains, prints, and the held-out accuracy it reports rose."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), str(tmp_path / "api")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "POET_MLX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dpo beta=0.1 poet=True" in out and "step  20  eval_loss" in out, out
    before, after = re.search(r"held-out accuracy: ([\d.]+) at step 0 -> ([\d.]+)", out).groups()
    assert float(after) > float(before), out


def test_console_script_help_runs():
    script = Path(sys.executable).parent / "poet-mlx"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "eval" in proc.stdout and proc.stderr == ""


def test_cli_imports_stay_light():
    """`poet-mlx --help` and `poet-mlx train --help` must not pay for mlx_lm or datasets."""
    code = ("import sys, poet_mlx.cli.main, poet_mlx.cli.train, poet_mlx.cli.evaluate, poet_mlx.cli.demo\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx_lm', 'datasets', 'transformers'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"heavy modules imported by the CLI: {proc.stdout}"


def test_data_check_offers_only_the_loss_setting_it_reads(capsys):
    assert cli("data", "check", "--help") == 0
    out = capsys.readouterr().out
    assert "--poet-ratio" in out
    for ignored in ("--loss ", "--beta", "--ld-alpha", "--loss-weights", "--cpo-alpha", "--label-smoothing"):
        assert ignored not in out, ignored

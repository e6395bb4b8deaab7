"""`poet-mlx data check DATA`: the preflight report, checked against what training itself does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli

GOOD = {"prompt": "Name a color.", "chosen": "Blue is a color.", "rejected": "No."}


def check_json(capsys, *argv) -> tuple[int, dict, str]:
    rc = cli("data", "check", *argv, "--json")
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err


def write_rows(path: Path, rows, raw: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return path


def test_clean_folder_without_model_reports_characters_and_asks_for_model(tiny_data_dir, capsys):
    rc, report, err = check_json(capsys, tiny_data_dir)
    assert rc == 0 and err == "" and report["ok"] and report["errors"] == []
    train, valid = report["splits"]["train"], report["splits"]["valid"]
    assert (train["rows"], train["valid_rows"], train["invalid_rows"]) == (48, 48, 0)
    assert valid["rows"] == 16 and train["format"] == "standard"
    rows = [json.loads(line) for line in (Path(tiny_data_dir) / "train.jsonl").read_text().splitlines()]
    assert train["chars"]["chosen"]["max"] == max(len(r["chosen"]) for r in rows)
    assert train["chars"]["prompt"]["min"] == min(len(r["prompt"]) for r in rows)
    assert "tokens" not in train and any("--model" in h for h in report["hints"])


def test_problems_duplicates_and_identical_pairs_are_counted(tmp_path, capsys):
    rows = [GOOD, GOOD, {**GOOD, "prompt": "Other?"}, {**GOOD, "rejected": GOOD["chosen"]},
            {"prompt": "p", "chosen": "c"}, {"prompt": "q", "chosen": "d"}]
    path = write_rows(tmp_path / "d.jsonl", rows, raw=b"{oops\n")
    rc, report, err = check_json(capsys, path)
    train = report["splits"]["train"]
    assert rc == 2 and not report["ok"]
    assert err.strip().splitlines() == [f"error: {report['errors'][0]}"]
    assert "4 invalid rows of 7" in err and "--skip-invalid" in err
    assert (train["rows"], train["valid_rows"], train["invalid_rows"]) == (7, 3, 4)
    assert train["identical_pairs"] == 1 and train["duplicate_rows"] == 1 and train["repeated_prompts"] == 1
    assert train["problem_kinds"] == {"missing field 'rejected'": 2, "'chosen' and 'rejected' are identical": 1,
                                      "not valid JSON": 1}
    assert train["problems"][0].startswith(f"{path} line 4: ")
    # The same data passes with --skip-invalid: the rows are counted, not fatal.
    rc, report, err = check_json(capsys, path, "--skip-invalid")
    assert rc == 0 and report["ok"] and report["splits"]["train"]["invalid_rows"] == 4 and err == ""


def test_token_counts_match_what_training_does(tiny_model_dir, tiny_data_dir, capsys):
    """With --model, the cut/drop/POET counts are those of the training pipeline on the same settings."""
    from poet_mlx.batching import pair_set, poet_stats
    from poet_mlx.config import RunConfig
    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import tokenize_pairs
    from poet_mlx.models import load_model

    limits = ["--max-length", 40, "--max-prompt-length", 11]
    rc, report, _ = check_json(capsys, tiny_data_dir, "--model", tiny_model_dir, *limits)
    assert rc == 0
    info = report["splits"]["train"]
    cfg = RunConfig.from_flat({"model": str(tiny_model_dir), "data": str(tiny_data_dir), "max_length": 40,
                               "max_prompt_length": 11, "poet": True})
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    rows, _ = load_split(cfg.data, "train")
    pairs, tok = tokenize_pairs(rows, tokenizer, 40, 11)
    assert info["limits"]["prompts_cut"] == tok.prompts_cut > 0
    assert info["limits"]["pairs_with_responses_cut"] == tok.responses_cut > 0
    assert info["limits"]["pairs_dropped"] == dict(tok.dropped)
    assert info["limits"]["pairs_kept"] == len(pairs)
    stats = poet_stats([pair_set(pairs, cfg.loss)])
    assert info["poet"]["pairs_cut"] == stats["pairs_cut_by_poet"]
    assert info["poet"]["response_tokens_removed"] == pytest.approx(stats["poet_token_saving"])
    full, _ = tokenize_pairs(rows, tokenizer, 10**9, 10**9 - 1)
    assert info["tokens"]["chosen"]["max"] == max(len(p.chosen) for p in full)
    assert info["tokens"]["prompt"]["min"] == min(len(p.prompt) for p in full)
    assert info["chat_template"] is True


def test_limits_that_drop_every_pair_fail(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"Q{i}?", "chosen": "Well, let me think: yes.", "rejected": f"Well, let me think: no {i}."}
            for i in range(3)]
    path = write_rows(tmp_path / "d.jsonl", rows)
    rc, report, err = check_json(capsys, path, "--model", tiny_model_dir, "--max-length", 8, "--max-prompt-length", 4)
    assert rc == 2 and report["splits"]["train"]["limits"]["pairs_kept"] == 0
    assert "drop every pair" in err and "--max-length (now 8)" in err


def test_conversational_rows_and_a_tokenizer_without_template(tmp_path, tiny_model_dir, capsys):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    conv = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    rc, report, err = check_json(capsys, write_rows(tmp_path / "c.jsonl", [conv]), "--model", model)
    assert rc == 2 and "need a chat template" in err and report["splits"]["train"]["format"] == "conversational"


def test_tables_by_default(tiny_data_dir, capsys):
    assert cli("data", "check", tiny_data_dir) == 0
    out = capsys.readouterr().out
    for part in ("train split of", "valid split of", "invalid rows", "lengths", "prompt (characters)",
                 "training would accept this data"):
        assert part in out, part


@pytest.mark.parametrize("data, part", [("missing.jsonl", "data file not found"),
                                        ("someone/no-such-dataset", "could not load dataset")])
def test_missing_or_offline_source_is_one_error_line(tmp_path, capsys, data, part):
    target = tmp_path / data if data.endswith(".jsonl") else data
    assert cli("data", "check", target) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and part in lines[0] and "Traceback" not in captured.err


def test_bad_setting_is_refused(tiny_data_dir, capsys):
    assert cli("data", "check", tiny_data_dir, "--max-length", 1) == 2
    assert "'max_length' must be > 1" in capsys.readouterr().err


def test_a_broken_valid_split_is_reported_with_the_train_split(tmp_path, tiny_data_dir, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text((Path(tiny_data_dir) / "train.jsonl").read_text())
    write_rows(folder / "valid.jsonl", [{"prompt": "p"}])
    rc, report, err = check_json(capsys, folder)
    assert rc == 2 and report["splits"]["train"]["valid_rows"] == 48
    assert "missing fields 'chosen' and 'rejected'" in report["splits"]["valid"]["error"]
    [line] = err.strip().splitlines()
    assert line.startswith("error: valid: the only row in") and "missing fields" in line

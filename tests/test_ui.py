"""The dashboard, the plain line mode and the end-of-run summary, drawn into in-memory consoles.

A scripted sequence of reporter calls, shaped like a real run (phases, header, steps, reports, validation,
checkpoint, warning, Ctrl-C), drives each reporter; one test drives the dashboard from a real training run.
"""

from __future__ import annotations

import io
import json
import math
import re
import shlex

import pytest
from conftest import run_config
from rich.console import Console
from rich.text import Text

from poet_mlx.cli.charts import History, block_chart, downsample, sparkline
from poet_mlx.cli.dashboard import DashboardReporter
from poet_mlx.cli.formats import kv_line, parse_plain_line
from poet_mlx.cli.ui import PlainReporter, next_commands, print_summary

ANSI = re.compile(r"\x1b\[")
# Written independently of cli/ui.py: KIND, then key=value pairs; a value is bare or a JSON string.
LINE = re.compile(r'^[a-z]+(?: [^\s="]+=(?:"(?:[^"\\]|\\.)*"|[^\s"]*))*$')

HEADER = {
    "model": "mlx-community/Qwen2.5-0.5B-Instruct-4bit", "model_type": "qwen2", "quantization": "4-bit",
    "total_params": 494_032_768, "trainable_params": 1_081_344, "loss": "simpo", "beta": 2.0,
    "gamma_beta_ratio": 0.5, "label_smoothing": 0.0, "poet": True, "poet_ratio": 1.0, "fine_tune_type": "lora",
    "rank": 8, "num_layers": 16, "keys": ["self_attn.q_proj", "self_attn.v_proj"], "train_pairs": 512,
    "valid_pairs": 64, "data_format": "standard", "rows_skipped": 2,
    "length_report": "510/512 pairs kept; 3 prompts cut to max_prompt_length; 2 dropped: prompt too long",
    "data_notes": [], "pairs_cut_by_poet": 500, "poet_token_saving": 0.19,
}
RUN = "/tmp/runs/simpo poet"  # a space in the path: commands must quote it


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def step_metrics(s: int) -> dict:
    return {"loss": 0.7 * math.exp(-s / 15), "rewards/chosen": -1.0, "rewards/rejected": -1.5,
            "rewards/margins": 0.1 * s, "rewards/accuracies": min(1.0, 0.5 + s / 60), "logps/chosen": -120.0 + s,
            "logps/rejected": -130.0 - s, "num_tokens/chosen": 40.0, "num_tokens/rejected": 40.0,
            "grad_norm": 1.0 / s, "learning_rate": 1e-5, "tokens_per_second": 2500.0, "pairs_per_second": 30.0,
            "step_seconds": 0.25}


def feed(r, clock: Clock, steps: int = 37, total: int = 400, stop=None) -> None:
    """The reporter calls of a run that is stopped by Ctrl-C after `steps` steps."""
    r.phase("loading model", 0, None)
    clock.now += 1.5
    r.phase("loading model", 1, 1)
    r.phase("loading train data", 0, None)
    r.phase("loading train data", 1, 1, note="512 rows (standard)")
    for done in (128, 256, 512):
        clock.now += 0.2
        r.phase("tokenizing train", done, 512)
    r.phase("reference log-probs (train)", 0, 512)
    clock.now += 20
    r.phase("reference log-probs (train)", 256, 512)
    r.phase("reference log-probs (train)", 512, 512, note="reused from cache")
    r.header(HEADER)
    r.phase("validation", 0, 64)
    r.phase("validation", 64, 64)
    r.log({"step": 0, "eval_loss": 0.6931, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0})
    for s in range(1, steps + 1):
        clock.now += 0.3
        m = step_metrics(s)
        r.step(s, total, m)
        if s % 10 == 0:
            r.log({"step": s, "epoch": s * 8 / 512, **m, "adapter_change": 0.1 * s, "tokens_seen": 640 * s,
                   "peak_memory_gb": 1.25, "elapsed_seconds": 0.25 * s})
            r.phase("validation", 0, 64)
            r.phase("validation", 64, 64)
            r.log({"step": s, "eval_loss": 0.5 / s, "eval_rewards/accuracies": 0.9, "eval_rewards/margins": 0.2 * s})
        if s == 20:
            r.phase("saving", 0, 1)
            r.phase("saving", 1, 1)
            r.checkpoint(20, f"{RUN}/checkpoints/step-0000020")
    r.warning("gradient norm has been zero for 10 steps: nothing is learning")
    if stop is not None:
        stop.append(True)
    r.phase("saving", 0, 1)
    r.phase("saving", 1, 1)
    r.checkpoint(steps, f"{RUN}/checkpoints/step-{steps:07d}")
    r.done({"steps": steps, "total_steps": total, "interrupted": True, "adapter_path": RUN,
            "resume_command": f"poet-mlx train --adapter-path '{RUN}' --resume", "train_seconds": 9.0,
            "tokens_seen": 23680, "pairs_seen": 296, "peak_memory_gb": 1.25, "last_eval": {}, "best_eval": {}})


def console(width: int) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor", record=True)


def lines_of(con: Console) -> list[str]:
    """What the console printed since the last call (exporting clears the recording)."""
    return con.export_text(styles=False).splitlines()


# -- dashboard ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 160])
def test_dashboard_renders_a_run_at_several_widths(width):
    clock, stop = Clock(), []
    con = console(width)
    d = DashboardReporter(console=con, clock=clock, stop=lambda: bool(stop))
    frames = []
    original_step = d.step

    def step(s, total, metrics):  # draw a frame mid-run, as the refresh thread would
        original_step(s, total, metrics)
        if s == 25:
            frames.append(d.render())
    d.step = step
    feed(d, clock, stop=stop)
    con.print(frames[0])
    mid = lines_of(con)  # exporting clears the recording
    con.print(d.render())
    last = lines_of(con)
    assert all(Text(line).cell_len <= width for line in mid + last), "a line is wider than the terminal"
    # Long values may wrap inside the panel at 80 columns: compare with borders and wrapping removed.
    mid_text, text = (re.sub(r"[│\s]+", " ", "\n".join(lines)) for lines in (mid, last))
    assert "step 25/400" in mid_text and "ETA" in mid_text and "epoch 0.39" in mid_text
    for needle in ("Qwen2.5-0.5B-Instruct-4bit", "1,081,344 trainable", "simpo", "gamma/beta=0.5",
                   "POET", "ratio 1", "rank 8", "self_attn.q_proj", "512 train / 64 valid", "2 rows skipped",
                   "2 dropped: prompt too long", "rewards/accuracies", "rewards/margins", "logps/chosen",
                   "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second", "pairs_per_second",
                   "peak_memory_gb", "validation", "eval_loss", "checkpoint saved at step 20",
                   "gradient norm has been zero", "stopped at step 37"):
        assert needle in text, needle
    assert "step 37/400" in text
    assert re.search(r"loss over steps 1\.\.37", text)


def test_dashboard_shows_each_phase_before_training_with_its_note():
    clock = Clock()
    con = console(100)
    d = DashboardReporter(console=con, clock=clock)
    d.phase("loading model", 0, None)
    clock.now += 2.0
    d.phase("loading model", 1, 1)
    d.phase("reference log-probs (train)", 0, 512)
    d.phase("reference log-probs (train)", 512, 512, note="reused from cache")
    d.phase("reference log-probs (valid)", 0, 64)
    d.phase("reference log-probs (valid)", 16, 64)
    con.print(d.render())
    text = "\n".join(lines_of(con))
    assert re.search(r"✓\s+loading model\s+2\.0 s", text)
    assert re.search(r"✓\s+reference log-probs \(train\)\s+reused from cache", text)
    assert re.search(r"reference log-probs \(valid\).*16/64", text)


def test_dashboard_notices_ctrl_c_before_the_step_ends():
    stop = []
    d = DashboardReporter(console=console(100), clock=Clock(), stop=lambda: bool(stop))
    d.step(1, 10, step_metrics(1))
    d.console.print(d.render())
    assert "Ctrl-C" not in d.console.export_text()
    stop.append(True)
    d.console.print(d.render())
    assert "Ctrl-C: stopping after this step and saving a checkpoint" in d.console.export_text()


def test_dashboard_shows_warnings_and_flags_a_non_finite_loss():
    """Memory warnings come from the library (`train.memory.peak_memory_warning`, tested in test_faults) as
    `warning` calls and records, like every other warning."""
    d = DashboardReporter(console=console(100), clock=Clock())
    d.log({"step": 10, "loss": 0.5, "peak_memory_gb": 7.0})
    assert d.warnings == []
    d.warning("peak memory 7.5 GB is over 90% of the machine's 8.0 GB: ...")
    d.warning("peak memory 7.5 GB is over 90% of the machine's 8.0 GB: ...")  # shown once
    assert len(d.warnings) == 1
    d.step(31, 100, {**step_metrics(31), "loss": float("nan")})
    assert len(d.warnings) == 2 and "non-finite loss" in d.warnings[1]
    d.log({"step": 32, "warning": "loss has not moved for 50 steps"})  # a warning record of metrics.jsonl
    assert d.warnings[-1] == "loss has not moved for 50 steps"


def test_dashboard_as_live_context_manager_leaves_the_last_frame():
    con = console(120)
    clock = Clock()
    with DashboardReporter(console=con, clock=clock, refresh_per_second=50) as d:
        feed(d, clock)
    text = con.export_text()
    assert "stopped at step 37" in text and "poet-mlx train" in text


def test_history_keeps_the_whole_run_in_bounded_memory():
    h = History(cap=8)
    for v in range(32):
        h.append(float(v))
    assert h.stride == 8 and len(h.values) == 4
    assert h.values == [3.5, 11.5, 19.5, 27.5]  # each value the mean of 8 consecutive steps


def test_dashboard_from_a_real_training_run(tiny_model_dir, tiny_data_dir, tmp_path):
    from poet_mlx.train.run import run_training

    con = console(160)
    cfg = run_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", iters=3, steps_per_eval=2)
    with DashboardReporter(console=con, title="test") as d:
        summary = run_training(cfg, d)
    con.print(d.render())
    text = con.export_text()
    assert "finished 3 steps" in text and "step 3/3" in text
    assert "reference log-probs (train)" in text or d.phases["reference log-probs (train)"]["note"] == "computed"
    assert [e["step"] for e in d.evals] == [0, 2, 3]
    assert summary["steps"] == 3


# -- small charts ---------------------------------------------------------------------------------------


def test_downsample_sparkline_and_block_chart():
    assert downsample([1, 2, 3, 4, 5, 6], 3) == [1.5, 3.5, 5.5]
    assert downsample([1.0, 2.0], 5) == [1.0, 2.0]
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([float("nan")]) == ""
    rows = block_chart([0.0, 1.0], width=2, height=2)
    assert rows == [" █", "▁█"]  # top row first; the low value still shows an eighth


# -- plain mode -----------------------------------------------------------------------------------------


def test_plain_mode_is_one_parseable_line_per_report():
    out, clock = io.StringIO(), Clock()
    r = PlainReporter(stream=out, clock=clock, progress_seconds=10.0)
    feed(r, clock)
    text = out.getvalue()
    assert not ANSI.search(text)
    lines = text.splitlines()
    parsed = []
    for line in lines:
        assert LINE.match(line), line
        parsed.append(parse_plain_line(line))
    kinds = [k for k, _ in parsed]
    assert kinds.count("train") == 3 and kinds.count("eval") == 4 and kinds.count("checkpoint") == 2
    assert kinds[-1] == "done" and kinds.count("warning") == 1
    ref = [p for k, p in parsed if k == "phase" and p["name"] == "reference log-probs (train)"]
    # start, one progress line (20 s > 10 s after the start), done with the note and the duration
    assert [p["state"] for p in ref] == ["start", "progress", "done"]
    assert ref[-1]["note"] == "reused from cache" and float(ref[-1]["seconds"]) == pytest.approx(20.0)
    run = next(p for k, p in parsed if k == "run")
    assert run["length_report"] == HEADER["length_report"] and run["keys"] == "self_attn.q_proj,self_attn.v_proj"
    train = [p for k, p in parsed if k == "train"]
    assert set(step_metrics(1)) <= set(train[0])  # the names of metrics.jsonl
    assert float(train[0]["rewards/margins"]) == pytest.approx(1.0)
    done = parsed[-1][1]
    assert done["resume_command"] == f"poet-mlx train --adapter-path '{RUN}' --resume"
    assert done["interrupted"] == "True"


def test_plain_quiet_prints_nothing():
    out, clock = io.StringIO(), Clock()
    feed(PlainReporter(stream=out, quiet=True, clock=clock), clock)
    assert out.getvalue() == ""


@pytest.mark.parametrize("value", ["a b", 'say "hi"', "k=v", "", "line\nbreak", "naïve ✓", "back\\slash"])
def test_plain_values_round_trip(value):
    line = kv_line("warning", {"message": value, "n": 3, "x": 0.5, "flag": False, "skip": None})
    assert "\n" not in line and LINE.match(line), line
    kind, pairs = parse_plain_line(line)
    assert kind == "warning" and pairs == {"message": value, "n": "3", "x": "0.5", "flag": "False"}


def test_plain_parser_rejects_other_text():
    for bad in ("", "Train step=1", "train step", 'train note="open'):
        with pytest.raises(ValueError):
            parse_plain_line(bad)


def test_train_plain_through_the_cli_parses_and_reports_phases(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from poet_mlx.cli.main import main

    run = tmp_path / "my run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(run),
               "--iters", "2", "--num-layers", "-1", "--rank", "4", "--batch-size", "4", "--max-length", "128",
               "--max-prompt-length", "32", "--steps-per-report", "1", "--steps-per-eval", "0", "--plain"])
    out = capsys.readouterr().out
    assert rc == 0
    parsed = [parse_plain_line(line) for line in out.splitlines()]
    phases = {p["name"]: p for k, p in parsed if k == "phase" and p["state"] == "done"}
    assert phases["reference log-probs (train)"]["note"] == "computed"
    assert {"loading model", "tokenizing train", "saving"} <= set(phases)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [p for k, p in parsed if k == "train"]
    assert [int(p["step"]) for p in train] == [m["step"] for m in metrics]
    assert set(train[0]) == {k for k, v in metrics[0].items() if v is not None}
    done = parsed[-1][1]
    assert done["resume_command"] == f"poet-mlx train --adapter-path {shlex.quote(str(run))} --resume"


# -- end-of-run summary -----------------------------------------------------------------------------------


def write_run(folder, interrupted_at=None):
    """A run folder with a metrics log (as the trainer writes it) and a checkpoint marker."""
    folder.mkdir(parents=True)
    records = [{"step": 0, "eval_loss": 0.693, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0}]
    for s in (10, 20, 30):
        records.append({"step": s, "epoch": s / 64, **step_metrics(s), "tokens_seen": 640 * s})
        records.append({"step": s, "eval_loss": [0.4, 0.2, 0.3][s // 10 - 1],
                        "eval_rewards/accuracies": [0.7, 0.9, 0.85][s // 10 - 1], "eval_rewards/margins": s / 10})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    import mlx.core as mx

    from poet_mlx.train.checkpoint import save_checkpoint

    save_checkpoint(folder, 30, {"w": mx.zeros((2,))}, {"m": mx.zeros((2,))}, {"step": 30})
    return {"steps": 30, "total_steps": 100 if interrupted_at else 30, "interrupted": bool(interrupted_at),
            "train_seconds": 75.0, "tokens_seen": 19200, "scored_tokens": 15000, "pairs_seen": 240,
            "peak_memory_gb": 1.25, "adapter_path": str(folder), "adapter_change": 3.2,
            "last_eval": records[-1], "best_eval": records[4], "header": HEADER,
            "resume_command": f"poet-mlx train --adapter-path '{folder}' --resume",
            "warnings": ["loss has not moved for 50 steps"]}


@pytest.mark.parametrize("width", [80, 160])
def test_summary_shows_final_and_best_files_and_commands(tmp_path, width):
    summary = write_run(tmp_path / "run one")
    con = console(width)
    print_summary(summary, console=con, wall_seconds=90.0)
    lines = lines_of(con)
    text = "\n".join(lines)
    assert "run summary: finished, 30/30 steps" in text
    row = next(line for line in lines if re.search(r"\beval_loss\b", line))
    assert "0.3 (step 30)" in row and "0.2 (step 20)" in row  # final, and best = lowest
    row = next(line for line in lines if "eval_rewards/accuracies" in line)
    assert "0.85 (step 30)" in row and "0.9 (step 20)" in row  # best = highest
    for needle in ("1:15 in training steps", "this command took 1:30", "19,200 tokens", "240 pairs", "saved 19.0%", "1.25 GB",
                   "loss has not moved", "adapters.safetensors", "metrics.jsonl", "step-0000030"):
        assert needle in text, needle
    assert "Resume with" not in text
    model, run = HEADER["model"], str(tmp_path / "run one")
    for cmd in next_commands(run, model):
        assert any(line.strip() == cmd for line in lines), f"command not on one line: {cmd}"
    assert f"poet-mlx chat --model {model} --adapter-path '{run}'" in text
    assert f"poet-mlx export --adapter-path '{run}' --format peft --out '{run}-peft'" in text


def test_summary_of_a_stopped_run_gives_the_resume_command(tmp_path):
    summary = write_run(tmp_path / "run", interrupted_at=30)
    con = console(80)
    print_summary(summary, console=con)
    lines = lines_of(con)
    assert "run summary: stopped at step 30/100 steps" in "\n".join(lines)
    i = next(i for i, line in enumerate(lines) if "Resume with" in line)
    assert lines[i + 1].strip() == summary["resume_command"]


def test_stopped_real_run_summary_resumes_with_the_printed_command(tiny_model_dir, tiny_data_dir, tmp_path):
    """Ctrl-C's path in process: the stop flag ends the run early, and the printed command resumes it."""
    from poet_mlx.cli.main import main
    from poet_mlx.reporting import RecordingReporter
    from poet_mlx.train.run import run_training

    cfg = run_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", iters=4)
    seen = RecordingReporter()
    summary = run_training(cfg, seen, should_stop=lambda: len(seen.of("step")) >= 2)
    assert summary["interrupted"] and summary["steps"] == 2
    con = console(100)
    print_summary(summary, console=con)
    lines = lines_of(con)
    cmd = lines[next(i for i, line in enumerate(lines) if "Resume with" in line) + 1].strip()
    argv = shlex.split(cmd)
    assert argv[:2] == ["poet-mlx", "train"]
    assert main(argv[1:] + ["--quiet"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # The first of the printed next commands, `poet-mlx report RUN`, works on the finished run.
    report = shlex.split(next(line.strip() for line in lines if line.strip().startswith("poet-mlx report")))
    assert main(report[1:] + ["--quiet"]) == 0
    assert "<svg" in (tmp_path / "run" / "report.html").read_text()

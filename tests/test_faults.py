"""Faults must not cost finished work: signals, kill -9 (even inside a save), full disks, NaN/inf, runs that
learn nothing, runs that will not fit in memory.

The kill tests run `python -m poet_mlx.cli.main train ...` as a real subprocess. To hit a save reliably,
POET_MLX_TEST_SAVE_DELAY (test-only, read by checkpoint.save_checkpoint) sleeps after each checkpoint file.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import cli, run_config

from poet_mlx.errors import PoetError
from poet_mlx.reporting import RecordingReporter
from poet_mlx.train import checkpoint as ckpt
from poet_mlx.train.checkpoint import latest_checkpoint, load_checkpoint, read_metrics, save_checkpoint
from poet_mlx.train.run import run_training

ROOT = Path(__file__).resolve().parent.parent
RUN_FLAGS = {"iters": 6, "batch_size": 2, "save_every": 2, "loss": "simpo", "dropout": 0.1}
"""A SimPO run of 6 steps with dropout (so the random state must be replayed too), saved every 2 steps."""


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def train_file(tiny_data_dir) -> Path:
    return Path(tiny_data_dir) / "train.jsonl"


def train_argv(model, data, run, **overrides) -> list[str]:
    """CLI flags for the same run as `run_config(model, data, run, **RUN_FLAGS, **overrides)`."""
    flat = {"model": model, "data": data, "adapter_path": run, "num_layers": -1, "rank": 4, "max_length": 128,
            "max_prompt_length": 32, "learning_rate": 1e-3, "steps_per_report": 1, "steps_per_eval": 0, "seed": 0,
            **RUN_FLAGS, **overrides}
    argv = []
    for key, value in flat.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def spawn(argv: list, env_extra: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "poet_mlx.cli.main", "train", *argv, "--plain"], cwd=ROOT,
                            env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the moment to kill it:\n{text}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def last_step(run: Path) -> int:
    try:
        return max([r["step"] for r in read_metrics(run) if "loss" in r] or [0])
    except PoetError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """Losses and adapters of the 6-step run, never interrupted (in process)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POET_MLX_CACHE", str(root / "cache"))
        run_training(run_config(tiny_model_dir, train_file(tiny_data_dir), root / "run", **RUN_FLAGS))
    return losses(root / "run"), mx.load(str(root / "run" / "adapters.safetensors"))


def assert_same_run(run: Path, uninterrupted) -> None:
    full_losses, full_adapters = uninterrupted
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 7))
    np.testing.assert_allclose(losses(run), full_losses, rtol=1e-5)
    adapters = mx.load(str(run / "adapters.safetensors"))
    for k, v in full_adapters.items():
        np.testing.assert_allclose(np.asarray(adapters[k]), np.asarray(v), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- kill -9


def test_sigkill_inside_a_save_keeps_the_last_checkpoint_and_resume_matches(tiny_model_dir, tiny_data_dir,
                                                                             tmp_path, uninterrupted):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    saving = ckpt.checkpoint_dir(run) / ".tmp-step-0000004"
    proc = spawn(train_argv(tiny_model_dir, train_file(tiny_data_dir), run), {ckpt.TEST_SAVE_DELAY: "0.2"}, log)
    try:
        # Kill while step 4's checkpoint is half written: its adapters are there, its manifest is not.
        wait_for(lambda: (saving / "adapters.safetensors").is_file(), proc, log=log)
    finally:
        proc.kill()
        proc.wait()
    assert saving.is_dir() and not (saving / "manifest.json").exists()
    last = latest_checkpoint(run)
    assert last.name == "step-0000002"
    adapters, optimizer, state = load_checkpoint(last)
    assert state["step"] == 2 and adapters and optimizer
    run_training(run_config(tiny_model_dir, train_file(tiny_data_dir), run, **RUN_FLAGS, resume=True))
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*")), "the next save removes a killed save's leftovers"
    assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_sigkill_during_training_then_resume_through_the_cli(tiny_model_dir, tiny_data_dir, tmp_path,
                                                             uninterrupted):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    argv = train_argv(tiny_model_dir, train_file(tiny_data_dir), run)
    proc = spawn(argv, log=log)
    try:
        wait_for(lambda: last_step(run) >= 3, proc, log=log)
    finally:
        proc.kill()
        proc.wait()
    assert latest_checkpoint(run).name in ("step-0000002", "step-0000004")
    resumed = subprocess.run([sys.executable, "-m", "poet_mlx.cli.main", "train", "--adapter-path", str(run),
                              "--resume", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_sigkill_at_random_moments_until_done(tiny_model_dir, tiny_data_dir, tmp_path, uninterrupted):
    """Kill -9 at arbitrary moments (loading, reference, training, saving) four times, resuming (or, before
    the first checkpoint, restarting) each time; then let it finish: the same run as never killed."""
    run, rng = tmp_path / "run", random.Random(6)
    argv = train_argv(tiny_model_dir, train_file(tiny_data_dir), run)
    for attempt in range(5):
        resume = latest_checkpoint(run) is not None
        log = tmp_path / f"log{attempt}.txt"
        proc = spawn(["--adapter-path", str(run), "--resume"] if resume else argv, {ckpt.TEST_SAVE_DELAY: "0.05"},
                     log=log)
        try:
            proc.wait(timeout=rng.uniform(1.0, 10.0) if attempt < 4 else 600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-2000:]
        if proc.returncode == 0:
            break
    assert proc.returncode == 0
    assert_same_run(run, uninterrupted)


# ---------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(tiny_model_dir, tiny_data_dir, tmp_path, sig):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    argv = train_argv(tiny_model_dir, train_file(tiny_data_dir), run, iters=500, save_every=0)
    proc = spawn(argv, log=log)
    try:
        wait_for(lambda: last_step(run) >= 2, proc, log=log)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert rc == 128 + sig, log.read_text()[-2000:]
    last = latest_checkpoint(run)
    _, _, state = load_checkpoint(last)
    assert state["step"] == last_step(run) >= 2 and last.name == f"step-{state['step']:07d}"
    done = next(line for line in log.read_text().splitlines() if line.startswith("done "))
    assert "interrupted=True" in done
    assert f'resume_command="poet-mlx train --adapter-path {run} --resume"' in done


def test_stop_before_training_saves_step_0_and_resumes(tiny_model_dir, tiny_data_dir, tmp_path):
    """A stop requested during the preparation takes effect at the first step: a resumable step-0 checkpoint."""
    run, data = tmp_path / "run", _small_data(tiny_data_dir, tmp_path)
    summary = run_training(run_config(tiny_model_dir, data, run, iters=2), should_stop=lambda: True)
    assert summary["interrupted"] and summary["steps"] == 0
    assert latest_checkpoint(run).name == "step-0000000"
    summary = run_training(run_config(tiny_model_dir, data, run, iters=2, resume=True))
    assert summary["steps"] == 2 and losses(run) and all(np.isfinite(losses(run)))


# ---------------------------------------------------------------------------------------------- disk full


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path,
                                                               monkeypatch, capsys):
    run = tmp_path / "run"
    real = ckpt.save_safetensors_atomic

    def full_disk(path, arrays, metadata=None):
        if ".tmp-step-0000002" in str(path) and Path(path).name == "optimizer.safetensors":
            real(path, arrays, metadata)  # half of it "fits"; then the device is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, arrays, metadata)

    monkeypatch.setattr(ckpt, "save_safetensors_atomic", full_disk)
    argv = train_argv(tiny_model_dir, train_file(tiny_data_dir), run, iters=3, save_every=1)
    assert cli("train", *argv, "--quiet") == 2
    err = capsys.readouterr().err
    line = err.strip()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert line.startswith("error: could not write checkpoint step 2: the disk is full")
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-0000001'}" in line
    assert f"resume with: poet-mlx train --adapter-path {run} --resume" in line and "free some space" in line
    assert latest_checkpoint(run).name == "step-0000001"
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*")), "the partial checkpoint is removed"
    assert load_checkpoint(latest_checkpoint(run))[2]["step"] == 1
    assert mx.load(str(run / "adapters.safetensors"))  # the step-1 adapters are still in place
    monkeypatch.undo()  # space freed: the run resumes where it stopped
    assert cli("train", "--adapter-path", run, "--resume", "--quiet") == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- NaN / inf


@pytest.fixture
def poisoned_batches(monkeypatch):
    """Make the reference log-probs NaN for chosen training micro-batch calls (1-based call numbers)."""
    from poet_mlx.batching import PairSet

    calls = {"n": 0, "poison": set()}
    real = PairSet.batch

    def batch(self, indices, pad_id):
        b = real(self, indices, pad_id)
        calls["n"] += 1
        if calls["poison"] == "all" or calls["n"] in calls["poison"]:
            b.ref_logps = np.full_like(b.ref_logps, np.nan)
        return b

    monkeypatch.setattr(PairSet, "batch", batch)
    return calls


def _small_data(tiny_data_dir, tmp_path) -> Path:
    lines = train_file(tiny_data_dir).read_text().splitlines()[:8]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_non_finite_batch_stops_with_a_diagnosis_then_resumes_skipping(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                      poisoned_batches, capsys):
    data, run = _small_data(tiny_data_dir, tmp_path), tmp_path / "run"
    poisoned_batches["poison"] = {2}
    argv = train_argv(tiny_model_dir, data, run, loss="dpo", dropout=0.0, iters=4, save_every=1)
    assert cli("train", *argv, "--quiet") == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: non-finite values at step 2 (loss=nan") and "grad_norm=nan" in line
    assert f"batch rows: {data} line " in line and "pass --skip-nonfinite" in line
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-0000001'}" in line
    assert f"--adapter-path {run} --resume --skip-nonfinite" in line
    assert latest_checkpoint(run).name == "step-0000001"
    assert all(bool(mx.isfinite(v).all()) for v in mx.load(str(run / "adapters.safetensors")).values())
    # The suggested command: the resumed run skips the bad batch and counts it.
    poisoned_batches.update(n=0, poison={2})
    assert cli("train", "--adapter-path", run, "--resume", "--skip-nonfinite", "--quiet") == 0
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4]
    warning = next(r for r in records if "warning" in r)
    assert warning["step"] == 3 and warning["kind"] == "nonfinite" and "batch skipped" in warning["warning"]
    assert next(r for r in records if r.get("step") == 4 and "loss" in r)["nonfinite_skipped"] == 1
    assert all(bool(mx.isfinite(v).all()) for v in mx.load(str(run / "adapters.safetensors")).values())


def test_skip_nonfinite_counts_and_gives_up_when_every_batch_is_bad(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                    poisoned_batches, monkeypatch):
    from poet_mlx.train import health

    data = _small_data(tiny_data_dir, tmp_path)
    poisoned_batches["poison"] = {3}
    rec = RecordingReporter()
    summary = run_training(run_config(tiny_model_dir, data, tmp_path / "a", iters=4, skip_nonfinite=True), rec)
    assert summary["steps"] == 4 and summary["nonfinite_skipped"] == 1
    assert len(summary["warnings"]) == 1 and "step 3: non-finite values (loss=nan" in summary["warnings"][0]
    assert rec.of("warning") == summary["warnings"]
    monkeypatch.setattr(health, "LEARNING_PATIENCE", 2)
    poisoned_batches.update(n=0, poison="all")
    with pytest.raises(PoetError, match="2 batches in a row were non-finite"):
        run_training(run_config(tiny_model_dir, data, tmp_path / "b", iters=4, skip_nonfinite=True))
    assert not (tmp_path / "b").exists(), "a run that never reached a checkpoint leaves nothing behind"


def test_non_finite_adapters_are_never_saved(tmp_path):
    good = {"a": mx.ones((2, 2))}
    save_checkpoint(tmp_path, 1, good, {"m": mx.zeros(2)}, {"step": 1})
    for bad in ({"a": mx.array([[1.0, float("nan")], [0.0, 1.0]])}, {"a": mx.array([float("inf")])}):
        with pytest.raises(PoetError, match=r"refusing to save checkpoint step 2: NaN/inf in a; the last good "
                                            r"checkpoint is .*step-0000001"):
            save_checkpoint(tmp_path, 2, bad, {"m": mx.zeros(2)}, {"step": 2})
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir() if p.name != "latest"] == ["step-0000001"]


# ---------------------------------------------------------------------------------------------- checkpoints


def _save(run, step, value=1.0):
    return save_checkpoint(run, step, {"w": mx.full((3,), value)}, {"m": mx.zeros(3)}, {"step": step})


def test_latest_survives_a_pruned_partial_or_unnamed_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    root = ckpt.checkpoint_dir(tmp_path)
    (root / "latest").write_text("step-0000099\n")  # names a folder that was pruned
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    (root / "latest").write_text("step-0000001\n")  # a kill between the rename and the `latest` update
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    with open(root / "step-0000003" / "adapters.safetensors", "r+b") as f:  # a truncated file
        f.truncate(10)
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    (root / "step-0000002" / "manifest.json").unlink()  # killed before its manifest
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    assert load_checkpoint(latest_checkpoint(tmp_path))[2] == {"step": 1}


def test_next_save_removes_a_killed_saves_leftovers_and_prunes(tmp_path):
    root = ckpt.checkpoint_dir(tmp_path)
    _save(tmp_path, 1)
    (root / ".tmp-step-0000007").mkdir()
    (root / ".tmp-step-0000007" / "adapters.safetensors").write_bytes(b"half")
    (root / ".old-step-0000001").mkdir()
    (tmp_path / ".adapters.safetensors.x1y2.tmp.safetensors").write_bytes(b"half")
    (root / ".latest.a1b2.tmp").write_text("step")
    for step in (2, 3, 4):
        _save(tmp_path, step, value=float(step))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000003", "step-0000004"]
    assert not list(tmp_path.glob(".*.tmp*"))
    _save(tmp_path, 4, value=9.0)  # re-saving a step replaces it whole
    assert float(load_checkpoint(root / "step-0000004")[0]["w"][0]) == 9.0
    assert not list(root.glob(".old-*"))


def test_torn_metrics_line_is_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    ckpt.MetricsLog(tmp_path, resume_step=1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_an_unfinished_start_does_not_block_the_next_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")  # what a kill before the first checkpoint leaves
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    (ckpt.checkpoint_dir(run)).mkdir()
    assert not ckpt.holds_run(run)
    notes = ckpt.prepare_run_folder(run, resume=False, overwrite=False)
    assert notes and "never reached a checkpoint" in notes[0]
    assert list(run.iterdir()) == []
    _save(run, 1)
    with pytest.raises(PoetError, match="already holds a training run"):
        ckpt.prepare_run_folder(run, resume=False, overwrite=False)


# ---------------------------------------------------------------------------------------------- learning


def test_learning_watch_rules():
    from poet_mlx.train.health import LOSS_FLAT_TOL, LearningWatch

    w = LearningWatch(patience=3)
    assert w.observe(0.69, 0.0) == [] and w.observe(0.5, 0.0) == []
    assert [k for k, _ in w.observe(0.4, 0.0)] == ["zero_grad"]
    assert w.observe(0.3, 0.0) == []  # once per run
    flat = LearningWatch(patience=3)
    assert flat.observe(0.6931, 1.0) == [] and flat.observe(0.6931 + LOSS_FLAT_TOL / 2, 1.0) == []
    assert [k for k, _ in flat.observe(0.6931 - LOSS_FLAT_TOL / 4, 1.0)] == ["flat_loss"]
    moving = LearningWatch(patience=3)
    assert all(moving.observe(loss, 1.0) == [] for loss in (0.69, 0.6, 0.69, 0.5, 0.69))
    still = LearningWatch(patience=3)
    assert still.adapters(3, 0.0, 1.0) and still.adapters(4, 0.0, 1.0) == []
    assert LearningWatch().adapters(10, 1e-3, 2.0) == []
    assert LearningWatch().adapters(10, 1e-12, 2.0) != []


def test_a_run_that_learns_nothing_warns_everywhere_and_a_big_one_warns_about_memory(
        tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    from poet_mlx.train import health
    from poet_mlx.train import memory as memory_mod

    monkeypatch.setattr(health, "LEARNING_PATIENCE", 3)
    monkeypatch.setattr(memory_mod, "total_memory", lambda: 10**6)  # a 1 MB machine
    estimates = []
    real_estimate = memory_mod.estimate_run_memory
    monkeypatch.setattr(memory_mod, "estimate_run_memory", lambda *a: estimates.append(real_estimate(*a))
                        or estimates[-1])
    run, rec = tmp_path / "run", RecordingReporter()
    mx.reset_peak_memory()
    summary = run_training(run_config(tiny_model_dir, _small_data(tiny_data_dir, tmp_path), run, iters=4,
                                      batch_size=2, learning_rate=1e-30, warmup_ratio=0.0), rec)
    kinds = [w["kind"] for w in (r for r in read_metrics(run) if "warning" in r)]
    assert "flat_loss" in kinds and "adapters_still" in kinds and "zero_grad" not in kinds
    memory = [w for w in rec.of("warning") if "may not fit in memory" in w]
    assert len(memory) == 1 and "against 1 MB of memory" in memory[0] and "--grad-checkpoint" in memory[0]
    assert summary["warnings"][0] == memory[0]
    assert any("loss has not moved" in w for w in summary["warnings"])
    assert any("adapters have not changed" in w for w in summary["warnings"])
    assert set(rec.of("warning")) == set(summary["warnings"])
    # The measured peak is checked too, once, by the library: --plain and CI runs see it, not only the dashboard.
    peak = [w for w in summary["warnings"] if w.startswith("peak memory")]
    assert len(peak) == 1 and "over 90% of the machine's 1 MB" in peak[0]
    assert "memory" in kinds
    # The estimate is in the right range: within a factor of 2 of the measured peak (tiny model, CPU).
    est, _ = estimates[0]
    assert 0.5 < est.total / (summary["peak_memory_gb"] * 1e9) < 2.0


def test_memory_estimate_scales_as_documented():
    from poet_mlx.train.memory import LOGIT_COPIES, estimate_memory

    dims = {"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864, "vocab_size": 151936,
            "num_attention_heads": 14}
    one = estimate_memory(5e8, 10**6, dims, batch_size=1, seq_len=512)
    two = estimate_memory(5e8, 10**6, dims, batch_size=2, seq_len=512)
    assert two.activations == 2 * one.activations and two.logits == 2 * one.logits
    assert one.logits == 2 * 512 * 151936 * 4 * LOGIT_COPIES
    assert one.trainable == 10**6 * 4 * 4  # value, gradient and AdamW's two slots, float32
    short = estimate_memory(5e8, 10**6, dims, batch_size=1, seq_len=512, response_len=128)
    assert short.logits == one.logits // 4, "logits only at the response positions"
    ckpt_est = estimate_memory(5e8, 10**6, dims, batch_size=1, seq_len=512, grad_checkpoint=True)
    assert ckpt_est.activations < one.activations / 4
    assert one.total == one.weights + one.trainable + one.activations + one.logits

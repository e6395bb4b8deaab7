"""The Linux BLAS routing (poet_mlx/backends/blas.py): off where it must be, and the same numbers with and without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poet_mlx.backends import blas

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_status(monkeypatch):
    """enable_fast_blas as if nothing had been loaded yet (the real library stays loaded in this process)."""
    monkeypatch.setattr(blas, "STATUS", blas.BlasStatus())

    def no_load():
        raise AssertionError("must not load any library here")

    monkeypatch.setattr(blas, "_load", no_load)


def test_no_op_off_linux(fresh_status, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    status = blas.enable_fast_blas()
    assert not status.active and "not Linux" in status.reason


@pytest.mark.parametrize("value", ["reference", "off", "0"])
def test_no_op_when_switched_off(fresh_status, monkeypatch, value):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv(blas.ENV_SWITCH, value)
    status = blas.enable_fast_blas()
    assert not status.active and f"{blas.ENV_SWITCH}={value}" in status.reason


@pytest.fixture
def mlx_core_loaded():
    """mlx.core imported for real (through poet_mlx's import hook) before `fresh_status` takes effect."""
    import mlx.core  # noqa: F401


def test_no_op_after_mlx_core(mlx_core_loaded, fresh_status, monkeypatch):
    """Once mlx.core is loaded it is too late to route it, and the status says so."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(blas.ENV_SWITCH, raising=False)
    status = blas.enable_fast_blas()
    assert not status.active and "mlx.core was imported before" in status.reason


def test_thread_count_choice(monkeypatch):
    for var in (blas.ENV_THREADS, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert blas.blas_threads() == 6  # every core (idle workers sleep: WORKER_TIMEOUT)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert blas.blas_threads() == 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert blas.blas_threads() is None  # the user's OpenBLAS setting wins
    monkeypatch.setenv(blas.ENV_THREADS, "2")
    assert blas.blas_threads() == 2


RUN = textwrap.dedent("""
    import json, sys
    import poet_mlx
    import mlx.core as mx
    import numpy as np
    from poet_mlx.backends import blas
    from poet_mlx.demo import task as demo_task
    from poet_mlx.demo import tiny
    from poet_mlx.config import RunConfig, validate
    from poet_mlx.train.run import run_training
    from poet_mlx.reporting import RecordingReporter

    out = sys.argv[1]
    a = mx.array(np.random.default_rng(0).standard_normal((192, 160)).astype(np.float32))
    b = mx.array(np.random.default_rng(1).standard_normal((160, 224)).astype(np.float32))
    model = tiny.save_tiny_model(out + "/model", texts=demo_task.corpus_texts(0), seed=0)
    data = demo_task.write_demo_dataset(out + "/data", n_train=16, n_valid=4, seed=0)
    cfg = RunConfig.from_flat({"model": str(model), "data": str(data), "adapter_path": out + "/run",
        "num_layers": -1, "rank": 4, "batch_size": 4, "iters": 3, "learning_rate": 1e-3, "max_length": 96,
        "max_prompt_length": 32, "steps_per_report": 1, "steps_per_eval": 0, "save_every": 0, "seed": 0})
    validate(cfg)
    rep = RecordingReporter()
    run_training(cfg, rep)
    import os
    print(json.dumps({"active": blas.STATUS.active, "matmul": np.array(a @ b).tolist(),
                      "timeout": os.environ.get(blas.WORKER_TIMEOUT[0]),
                      "losses": [m["loss"] for _, _, m in rep.of("step")]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the routing exists on Linux only")
def test_same_results_with_and_without_openblas(tmp_path):
    """A short DPO run and a matmul, in two fresh processes (the choice is made when mlx.core loads)."""
    pytest.importorskip("scipy_openblas32")
    procs = {}
    for mode in ("openblas", "reference"):
        env = {**os.environ, "POET_MLX_CACHE": str(tmp_path / mode / "cache"), "HF_HUB_OFFLINE": "1"}
        env.pop(blas.ENV_SWITCH, None)
        env.pop(blas.WORKER_TIMEOUT[0], None)
        if mode == "reference":
            env[blas.ENV_SWITCH] = "reference"
        (tmp_path / mode).mkdir()
        procs[mode] = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / mode)], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        results[mode] = json.loads(stdout.strip().splitlines()[-1])
    fast, ref = results["openblas"], results["reference"]
    if not fast["active"]:
        pytest.skip("OpenBLAS could not be loaded here (no C compiler?)")
    assert not ref["active"]
    # OpenBLAS's idle workers sleep at once unless the user chose otherwise.
    assert fast["timeout"] == blas.WORKER_TIMEOUT[1]
    import numpy as np

    np.testing.assert_allclose(fast["matmul"], ref["matmul"], rtol=1e-5, atol=1e-4)
    assert len(fast["losses"]) == 3
    np.testing.assert_allclose(fast["losses"], ref["losses"], rtol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="compiles C on Linux only")
def test_compile_to_is_atomic_and_leaves_nothing_when_it_fails(tmp_path):
    """`backends.compile_to` (the shim's and the kernels' build): the output appears whole under its name, and
    a failed compile raises with the compiler's message and leaves no file in the folder."""
    import shutil

    from poet_mlx.backends import compile_to

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    good, bad = tmp_path / "good.c", tmp_path / "bad.c"
    good.write_text("int answer(void) { return 42; }\n")
    bad.write_text("int answer(void) { return }\n")
    out = tmp_path / "lib" / "libgood.so"
    assert compile_to([compiler, "-shared", "-fPIC", str(good)], out, "the test library", timeout=120) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["libgood.so"]
    with pytest.raises(RuntimeError, match="(?s)compiling the test library failed: .*error"):
        compile_to([compiler, "-shared", "-fPIC", str(bad)], tmp_path / "bad" / "libbad.so", "the test library", 120)
    assert list((tmp_path / "bad").iterdir()) == []

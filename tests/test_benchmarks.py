"""The benchmark (benchmarks/) in small, and the library changes it motivated: `fast_quant` (4-bit layers on
the CPU through dequantize + GEMM) and `per_token_logps`' hand-written gradient (memory flat in V)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report, sections, workloads  # noqa: E402
from poet_mlx.backends import fast_quant  # noqa: E402
from poet_mlx.logprobs import per_token_logps  # noqa: E402

# -- workloads ---------------------------------------------------------------------------------------------

def test_synthetic_rows_are_deterministic_with_a_length_spread():
    spec = workloads.DataSpec(pairs=40, seed=3)
    rows = workloads.make_rows(spec)
    assert rows == workloads.make_rows(spec) and rows != workloads.make_rows(workloads.DataSpec(pairs=40, seed=4))
    chosen = [len(r["chosen"].split()) for r in rows]
    rejected = [len(r["rejected"].split()) for r in rows]
    assert min(chosen + rejected) >= 30 and max(chosen + rejected) <= 200
    assert sum(c != r for c, r in zip(chosen, rejected)) > 30  # responses of a pair differ in length


@pytest.mark.parametrize("name", list(workloads.MODELS))
def test_model_spec_param_counts_match_mlx_lm(name):
    """The advertised sizes (7.6M, 25M, Qwen2.5-0.5B's 494M) are those of the models mlx-lm builds."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama, qwen2

    spec = workloads.MODELS[name]
    module = qwen2 if spec.model_type == "qwen2" else llama
    model = module.Model(module.ModelArgs.from_dict(workloads._config(spec, 100)))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == spec.params  # lazy: nothing allocated
    assert {"tiny-7.6M": 7.6e6, "llama-25M": 25.0e6, "qwen2.5-0.5b-4bit": 494.0e6}[name] == pytest.approx(
        spec.params, rel=0.01)


def test_table_aligns_and_formats():
    text = report.table("T", ["a", "value"], [["x", 1.23456], ["long name", None]], "note")
    lines = text.splitlines()
    assert lines[0] == "T" and lines[-1] == "note"
    assert len({len(line) for line in lines[1:-1]}) == 1
    assert "1.23" in text and "-" in lines[-2]


# -- the benchmark's children, in small ---------------------------------------------------------------------

def test_training_case_measures_steps_memory_and_reference(tiny_model_dir, tiny_data_dir, tmp_path):
    cfg = sections.train_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", "dpo+poet", steps=3, batch=4,
                                max_length=96, num_layers=2)
    r = sections.run_ours(tmp_path, cfg)
    assert "error" not in r, r
    assert r["steps"] == 3 and len(r["step_times"]) == 3 and r["step_s"] > 0
    assert r["reference_s"] is not None and r["peak_train_gb"] > 0 and r["max_rss_gb"] > 0
    assert 0 < r["poet_token_saving"] < 1 and r["scored_tokens_per_pair"] < r["response_tokens_per_pair"]
    assert r["response_tokens_per_s"] < r["tokens_per_s"]


@pytest.mark.slow
def test_variants_baselines_give_the_same_loss(tiny_model_dir, tiny_data_dir):
    """The "before" designs rebuilt in the benchmark compute the same objective as the library's step."""
    base = {"model": str(tiny_model_dir), "data": str(tiny_data_dir), "loss": "dpo", "poet": False, "steps": 2,
            "batch_size": 4, "max_length": 96, "max_prompt_length": 32, "num_layers": 2}
    from concurrent.futures import ThreadPoolExecutor

    variants = ("ours", "peer_like+naive_logprobs", "full_head+grad_checkpoint")
    with ThreadPoolExecutor(len(variants)) as pool:  # child processes: use both cores
        results = list(pool.map(lambda v: sections.run_child("variants", {**base, "variant": v}), variants))
    losses = {}
    for variant, r in zip(variants, results):
        assert "error" not in r, r
        losses[variant] = r["final_loss"]
        assert 0 <= r["epoch_padding_fraction"] < 1
    assert np.allclose(list(losses.values()), losses["ours"], rtol=1e-4), losses


def test_peer_section_skips_without_the_peer(tmp_path):
    data, text = sections.section_peer(tmp_path, sections.Plan.quick(), None)
    assert "skipped" in data and "--setup-peer" in text


# -- fast_quant --------------------------------------------------------------------------------------------

def _quantized(n: int, k: int, seed: int):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) / k ** 0.5
    return mx.quantize(w, 64, 4)


@pytest.mark.parametrize("bits,group_size,scale_dtype", [(4, 32, mx.float32), (4, 64, mx.float16), (2, 128, mx.float32),
                                                         (8, 32, mx.bfloat16), (3, 64, mx.float32),
                                                         (6, 32, mx.float16)])
def test_affine_dequantizer_equals_mx_dequantize(bits, group_size, scale_dtype):
    w = mx.random.normal((40, 256), key=mx.random.key(bits)) * 3
    wq, s, b = mx.quantize(w, group_size, bits)
    s, b = s.astype(scale_dtype), b.astype(scale_dtype)
    # Half-precision scales are widened first: MLX's kernel computes in the scales' dtype, this in float32.
    want = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size, bits, dtype=mx.float32)
    got = fast_quant.affine_dequantizer(group_size, bits)(wq, s, b)
    assert got.dtype == mx.float32 and got.shape == (40, 256)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blocks", [False, True])
def test_dequantized_matmul_equals_quantized_matmul_with_its_gradient(monkeypatch, blocks):
    if blocks:  # several output blocks, the last one ragged
        monkeypatch.setattr(fast_quant, "BLOCK_ELEMENTS", 128 * 40)
        fast_quant.dequantized_matmul.cache_clear()
    wq, s, b = _quantized(200, 128, 0)
    x = mx.random.normal((3, 5, 128), key=mx.random.key(1))
    f = fast_quant.dequantized_matmul(64, 4)
    native = lambda x: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)  # noqa: E731
    np.testing.assert_allclose(np.array(f(x, wq, s, b)), np.array(native(x)), rtol=1e-5, atol=1e-5)
    cot = mx.random.normal((3, 5, 200), key=mx.random.key(2))
    g_fast = mx.compile(mx.grad(lambda x: (f(x, wq, s, b) * cot).sum()))(x)
    g_native = mx.grad(lambda x: (native(x) * cot).sum())(x)
    np.testing.assert_allclose(np.array(g_fast), np.array(g_native), rtol=1e-4, atol=1e-5)
    fast_quant.dequantized_matmul.cache_clear()


def test_dequantized_matmul_computes_in_float32():
    wq, s, b = _quantized(64, 128, 3)
    x = mx.random.normal((4, 128), key=mx.random.key(4)).astype(mx.bfloat16)
    assert fast_quant.dequantized_matmul(64, 4)(x, wq, s, b).dtype == mx.float32


def test_accelerated_layers_keep_mlx_kernel_for_a_few_rows(monkeypatch):
    """One generated token per reply goes through MLX's kernel (faster there); a batch of tokens through
    dequantize + GEMM. Both give the layer's output."""
    import mlx.nn as nn

    layer = nn.QuantizedLinear(128, 64, bias=True, group_size=64, bits=4)
    x_few = mx.random.normal((1, 1, 128), key=mx.random.key(5))
    x_many = mx.random.normal((2, 8, 128), key=mx.random.key(6))
    native = [np.array(layer(x)) for x in (x_few, x_many)]
    assert fast_quant.accelerate_quantized(nn.Sequential(layer)) == 1 or not fast_quant.wanted()
    expanded = []
    real = fast_quant.dequantized_matmul
    monkeypatch.setattr(fast_quant, "dequantized_matmul", lambda g, b: expanded.append(1) or real(g, b))
    np.testing.assert_array_equal(np.array(layer(x_few)), native[0])
    np.testing.assert_allclose(np.array(layer(x_many)), native[1], rtol=1e-5, atol=1e-5)
    assert len(expanded) == (1 if fast_quant.wanted() else 0)


def test_accelerated_quantized_model_trains_like_the_native_one(tiny_quant_model_dir, monkeypatch):
    """Same loss and LoRA gradients through a tiny 4-bit llama; parameter names unchanged."""
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    monkeypatch.setattr(sys, "platform", "linux")
    tokens = mx.array(np.random.default_rng(0).integers(7, 200, (2, 24)), mx.int32)
    out = {}
    for mode in ("native", "fast"):
        model, _ = load(str(tiny_quant_model_dir))
        names = sorted(k for k, _ in tree_flatten(model.parameters()))
        if mode == "fast":
            assert fast_quant.accelerate_quantized(model) > 0
            assert names == sorted(k for k, _ in tree_flatten(model.parameters()))
            assert isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear)
        model.freeze()
        mx.random.seed(0)
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0})
        for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters())):  # non-zero B: grads reach A
            model.update(_nested(k, mx.random.normal(v.shape, key=mx.random.key(i)) * 0.05))
        loss = lambda m: per_token_logps(m(tokens[:, :-1]), tokens[:, 1:]).sum()  # noqa: E731
        value, grads = nn.value_and_grad(model, loss)(model)
        out[mode] = (value.item(), {k: np.array(g) for k, g in tree_flatten(grads)})
    assert out["fast"][0] == pytest.approx(out["native"][0], rel=1e-5)
    for k, g in out["native"][1].items():
        np.testing.assert_allclose(out["fast"][1][k], g, rtol=1e-3, atol=1e-4)


def _nested(key: str, value):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(key, value)])


def test_accelerate_quantized_is_off_where_not_wanted(tiny_quant_model_dir, monkeypatch):
    from mlx_lm import load

    model, _ = load(str(tiny_quant_model_dir))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert fast_quant.accelerate_quantized(model) == 0
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv(fast_quant.ENV_SWITCH, "native")
    assert fast_quant.accelerate_quantized(model) == 0
    assert type(model.layers[0].mlp.up_proj) is nn.QuantizedLinear


def test_load_model_accelerates_quantized_models_on_linux_cpu(tiny_quant_model_dir, monkeypatch):
    from poet_mlx.models import load_model

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(fast_quant.ENV_SWITCH, raising=False)
    model, _, _ = load_model(str(tiny_quant_model_dir))
    wanted = mx.default_device() == mx.cpu
    assert getattr(model.layers[0].mlp.up_proj, "_poet_fast_quant", False) == wanted


# -- per_token_logps' gradient ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,chunk", [(mx.float32, 1 << 24), (mx.bfloat16, 1 << 24), (mx.bfloat16, 300)])
def test_per_token_logps_gradient_matches_log_softmax(dtype, chunk):
    logits = (mx.random.normal((2, 7, 50), key=mx.random.key(5)) * 4).astype(dtype)
    targets = mx.random.randint(0, 50, (2, 7), key=mx.random.key(6))
    w = mx.random.normal((2, 7), key=mx.random.key(7))

    def naive(x):
        logp = nn.log_softmax(x.astype(mx.float32), axis=-1)
        return (mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * w).sum()

    ours = mx.grad(lambda x: (per_token_logps(x, targets, chunk) * w).sum())(logits)
    assert ours.dtype == dtype
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), np.array(mx.grad(naive)(logits).astype(mx.float32)),
                               rtol=tol, atol=tol)


def test_per_token_logps_training_memory_does_not_grow_with_the_vocabulary():
    """Compiled gradient w.r.t. float32 logits: nothing beyond the logits and their gradient (the automatic
    gradient of a chunked logsumexp held several (N, T, V) copies, growing with the number of chunks).
    Measured with MLX's run-ahead bounded (`backends.runahead`), so that what is measured is the graph's
    own temporaries, not the outputs of ops queued ahead (which depend on the machine's speed)."""
    extra = []
    before = mx.set_memory_limit(0)
    try:
        _logps_grad_extra(extra)
    finally:
        mx.set_memory_limit(before)
    assert max(extra) < 0.1, extra


def _logps_grad_extra(extra: list) -> None:
    for v in (8192, 65536):
        logits = mx.random.normal((2, 64, v), key=mx.random.key(v))
        targets = mx.random.randint(0, v, (2, 64), key=mx.random.key(v + 1))
        grad_fn = mx.compile(mx.grad(lambda x: per_token_logps(x, targets, 1 << 18).sum()))
        mx.eval(logits, targets, grad_fn(logits))
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        g = grad_fn(logits)
        mx.eval(g)
        extra.append((mx.get_peak_memory() - base - g.nbytes) / logits.nbytes)
        del g


@pytest.mark.slow
def test_quick_benchmark_runs_end_to_end(tmp_path):
    """`bench.py --quick` (about a minute): every section prints and the JSON holds its numbers."""
    import subprocess

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--work", str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {"blas", "models", "peer", "lossmem"} <= set(results["sections"])
    assert all("error" not in r for r in results["sections"]["models"]["result"])


# -- the real-model benchmark's helpers ----------------------------------------------------------------------

def test_flops_count_matches_hand_numbers():
    """SmolLM2-135M's shapes: 3,538,944 matmul weights per layer; one row of 10 positions, 4 scored, the last
    2 of 3 layers adapted with rank 1, worked out by hand."""
    from benchmarks import flops

    s = flops.Shape(hidden=576, layers=3, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)
    assert s.layer_params == 3_538_944
    fwd = flops.row_flops(s, 10, 4, 2, 1, train=False)
    assert fwd["layers_forward"] == 2 * 10 * 3_538_944 * 3
    assert fwd["attention_forward"] == 4 * 9 * 64 * 55 * 3  # 10 * 11 / 2 = 55 causal pairs
    assert fwd["head_forward"] == 2 * 4 * 576 * 49152
    lora_layer = 2 * 10 * sum(i + o for i, o in s.projections)
    assert fwd["lora"] == lora_layer * 2
    train = flops.row_flops(s, 10, 4, 2, 1, train=True)
    qkv = 2 * 10 * (576 * 576 + 2 * 576 * 192)
    assert train["layers_backward"] == 2 * 10 * 3_538_944 * 2 - qkv
    assert train["attention_backward"] == 2 * 4 * 9 * 64 * 55 * 2
    assert train["head_backward"] == fwd["head_forward"] and train["lora"] == 3 * lora_layer * 2
    assert flops.total([fwd, fwd])["total"] == 2 * sum(fwd.values())


def test_real_data_fills_the_length_with_different_responses(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from benchmarks import real

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))  # one token per word: lengths are word counts
    folder = real.real_data(tmp_path / "work", str(tmp_path), pairs=6, length=128)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        p, c, j = (len(r[k].split()) for k in ("prompt", "chosen", "rejected"))
        assert p + max(c, j) <= 128 and p + min(c, j) >= 0.6 * (128 - 24 - p)
    assert any(len(r["chosen"].split()) != len(r["rejected"].split()) for r in rows)


def test_least_squares_line():
    from benchmarks import real

    a, b, worst = real._line([1, 2, 4], [3, 5, 9])
    assert abs(a - 1) < 1e-9 and abs(b - 2) < 1e-9 and worst < 1e-9


def test_peer_verdict_names_the_cases_that_meet_both_targets():
    from benchmarks import real

    #        system, case, step, epoch, peak, rss, x time, x peak, x peak same ckpt, load
    rows = [["poet-mlx", "dpo", 4.4, 17, 1.36, 1.5, 0.44, 0.81, 0.81, 1.6],
            ["poet-mlx", "dpo, grad ckpt", 4.9, 18, 0.75, 0.9, 0.49, 0.45, 0.80, 1.6],
            ["poet-mlx", "dpo+poet", 5.2, 18, 0.70, 0.9, 0.52, 0.42, 0.42, 1.6],
            ["unsloth-zoo", "dpo", 10.0, 90, 1.68, 1.9, 1.0, 1.0, 1.0, 1.6]]
    text = real._peer_verdict(rows)
    assert "fastest run by: dpo, grad ckpt;" in text and "same checkpointing: no case." in text
    rows[0][8] = 0.6
    assert "same checkpointing: dpo." in real._peer_verdict(rows)
    assert real._peer_verdict(rows[3:]) == ""


def test_the_step_rate_counts_steps_whose_batch_shape_an_earlier_step_had():
    from benchmarks import real_child

    a, b, c = [[8, 448], [8, 480], 3072, 3072], [[8, 480], [8, 512], 3072, 3584], [[8, 416], [8, 448], 2560, 3072]
    assert real_child.compiled_steps([a, b, a, b, c, a]) == ([2, 3, 5], [1, 4])
    assert real_child.compiled_steps([a, b]) == ([], [1])
    assert real_child.compiled_steps([a]) == ([], [])


def test_a_peer_child_runs_with_mlx_s_own_tape_width():
    """A peer imports poet_mlx for its BLAS routing only: in its own process that import must not widen MLX's
    evaluation tape (`parallel_rows`), which raised unsloth-zoo's peak by 0.2 GB in the side-by-side runs."""
    import subprocess
    import sys

    from benchmarks import sections
    from poet_mlx.backends import parallel_rows

    name = parallel_rows.BFS_WIDTH[0]
    code = f"import os, poet_mlx, mlx.core; print(os.environ.get({name!r}, 'unset'))"
    env = {k: v for k, v in sections.child_env(sections.PEER_ENV).items() if k != name}  # as in a fresh shell
    peer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert peer.stdout.split()[-1] == "unset"
    ours = subprocess.run([sys.executable, "-c", code], env={**env, "POET_MLX_ROWS": ""}, capture_output=True,
                          text=True, check=True)
    assert ours.stdout.split()[-1] == parallel_rows.BFS_WIDTH[1]  # the control: without the switch it is set

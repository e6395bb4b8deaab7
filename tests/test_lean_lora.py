"""`backends.lean_lora`: adapted llama-style blocks whose backward recomputes the norms, SwiGLU and the queries.
Same values as mlx-lm's own block, gradients equal to autodiff's to float32 rounding, less memory kept, and
mlx-lm's code wherever the lean path does not apply."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from poet_mlx.adapters import attach_trainable, enable_grad_checkpoint, lora_parameters
from poet_mlx.backends import fast_layers, fast_quant, lean_lora

pytestmark = pytest.mark.skipif(not lean_lora.wanted(), reason="the lean blocks are Linux CPU only")


def model_of(model_type: str = "llama", layers: int = 3, quantized: bool = False, **extra):
    """A small mlx-lm model of `model_type` with poet-mlx's CPU layers, as `models.load_model` sets them up."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = module.ModelArgs.from_dict({"model_type": model_type, "hidden_size": 64, "num_hidden_layers": layers,
                                       "max_position_embeddings": 512, "tie_word_embeddings": False,
                                       "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "rms_norm_eps": 1e-5, "vocab_size": 101, **extra})
    mx.random.seed(0)
    model = module.Model(args)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
        fast_quant.accelerate_quantized(model)
    mx.eval(model.parameters())
    fast_layers.accelerate_layers(model)
    return model


def adapted(model, layers: int = 2, keys=None, fine_tune_type: str = "lora", dropout: float = 0.0):
    """LoRA on the last `layers` blocks, with B drawn (not zero) so that every adapter gradient is non-zero."""
    mx.random.seed(1)
    attach_trainable(model, fine_tune_type, layers, lora_parameters(4, 2.0, dropout, keys))
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    mx.eval(model.parameters())
    return model


def block_outputs_and_grads(model, x, cotangent, original: bool, compiled: bool = False):
    """Loss <trunk blocks(x), cotangent> and its gradient, through the lean blocks or through each class's own
    (mlx-lm's) code."""

    def run(block, h):
        if original:
            return type(block)._poet_lean_base.__call__(block, h, "causal", None)
        return block(h, "causal", None)

    def loss(m, x):
        h = x
        for block in m.model.layers:
            h = run(block, h)
        return (h * cotangent).sum()

    step = nn.value_and_grad(model, loss)
    fn = (mx.compile(lambda x: step(model, x), inputs=[model.state], outputs=[model.state]) if compiled
          else lambda x: step(model, x))
    value, grads = fn(x)
    mx.eval(value, grads)
    return value, dict(tree_flatten(grads))


def assert_same_grads(model, compiled: bool = False, rtol: float = 2e-5, t: int = 37):
    x = mx.random.normal((2, t, model.args.hidden_size), key=mx.random.key(3))
    cotangent = mx.random.normal(x.shape, key=mx.random.key(4))
    ref_value, ref = block_outputs_and_grads(model, x, cotangent, original=True, compiled=compiled)
    value, ours = block_outputs_and_grads(model, x, cotangent, original=False, compiled=compiled)
    assert ref and ours.keys() == ref.keys()
    assert abs(value.item() - ref_value.item()) <= 1e-5 * abs(ref_value.item())
    for name, g in ref.items():
        scale = mx.abs(g).max().item()
        assert scale > 0, name  # every adapter really gets a gradient
        assert mx.abs(ours[name] - g).max().item() <= rtol * scale, name


def test_every_llama_block_changes_and_keeps_its_parameters():
    model = model_of()
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    assert lean_lora.lean_blocks(model) == 3
    assert lean_lora.lean_blocks(model) == 0  # once
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == names
    assert all(type(b).__name__ == "LeanTransformerBlock" for b in model.model.layers)


@pytest.mark.parametrize("compiled", [False, True])
def test_lora_on_every_projection_same_values_and_gradients(compiled):
    model = adapted(model_of())
    lean_lora.lean_blocks(model)
    assert_same_grads(model, compiled)


def test_the_forward_is_mlx_lms_bit_for_bit():
    model = adapted(model_of())
    lean_lora.lean_blocks(model)
    x = mx.random.normal((2, 37, 64), key=mx.random.key(3))
    for block in model.model.layers:
        ours, ref = block(x, "causal", None), type(block)._poet_lean_base.__call__(block, x, "causal", None)
        assert mx.array_equal(ours, ref).item()


@pytest.mark.parametrize("keys", [["self_attn.q_proj", "self_attn.v_proj"], ["mlp.down_proj"], ["self_attn.k_proj"]])
def test_lora_on_some_projections_the_frozen_ones_pass_gradients_through(keys):
    model = adapted(model_of(), keys=keys)
    lean_lora.lean_blocks(model)
    assert_same_grads(model)


@pytest.mark.parametrize("model_type, extra", [("qwen2", {}), ("gemma", {"head_dim": 16}),
                                               ("qwen3", {"head_dim": 16, "rope_theta": 10000.0})])
def test_other_architectures(model_type, extra):
    """qwen2: biased q/k/v; gemma: its own norm (1 + w) and MLP (GELU: mlx-lm's code); qwen3: its own attention
    (q/k norms: mlx-lm's code), its MLP goes lean."""
    model = adapted(model_of(model_type, **extra))
    assert lean_lora.lean_blocks(model) == 3
    assert_same_grads(model)


def test_a_4bit_base_goes_through_its_own_vjp():
    model = adapted(model_of(quantized=True))
    lean_lora.lean_blocks(model)
    assert_same_grads(model, rtol=1e-4)


def test_short_and_long_sequences():
    """Two tokens (one token's query gets no gradient at all: a softmax over one key is 1) and two query
    blocks of the blocked attention."""
    model = adapted(model_of())
    lean_lora.lean_blocks(model)
    assert_same_grads(model, t=2)
    assert_same_grads(model, t=fast_layers.BLOCK + 3)


def test_with_grad_checkpoint():
    model = adapted(model_of())
    lean_lora.lean_blocks(model)
    enable_grad_checkpoint(model)
    assert_same_grads(model)


def _count_lean_calls(monkeypatch) -> list:
    calls = []
    for name in ("norm_projections", "swiglu_mlp", "projected_attention"):
        fn = getattr(lean_lora, name)
        monkeypatch.setattr(lean_lora, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    return calls


@pytest.mark.parametrize("case", ["dora", "dropout", "full", "not adapted"])
def test_where_the_lean_path_does_not_apply_mlx_lms_code_runs(case, monkeypatch):
    """DoRA and LoRA dropout compute something else; full fine-tuning trains the weights the lean path treats
    as frozen; a block without adapters needs no backward."""
    model = model_of()
    if case != "not adapted":
        adapted(model, fine_tune_type={"dora": "dora", "full": "full"}.get(case, "lora"),
                dropout=0.3 if case == "dropout" else 0.0)
    lean_lora.lean_blocks(model)
    model.train()
    calls = _count_lean_calls(monkeypatch)
    x = mx.random.normal((2, 9, 64), key=mx.random.key(3))
    for block in model.model.layers:
        mx.random.seed(5)
        ours = block(x, "causal", None)
        mx.random.seed(5)
        assert mx.array_equal(ours, type(block)._poet_lean_base.__call__(block, x, "causal", None)).item()
    assert calls == []


def test_generation_with_a_cache_runs_mlx_lms_code(monkeypatch):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model = adapted(model_of())
    lean_lora.lean_blocks(model)
    calls = _count_lean_calls(monkeypatch)
    prompt = mx.array([1, 5, 7, 9])
    tokens = [t for t, _ in zip((int(t) for t, _ in generate_step(prompt, model, max_tokens=3,
                                                                    prompt_cache=make_prompt_cache(model))),
                                 range(3))]
    assert len(tokens) == 3 and calls == []


def test_an_explicit_mask_goes_through_norm_projections_and_mlx_lms_attention(monkeypatch):
    model = adapted(model_of())
    lean_lora.lean_blocks(model)
    calls = _count_lean_calls(monkeypatch)
    x = mx.random.normal((2, 9, 64), key=mx.random.key(3))
    mask = mx.tril(mx.ones((9, 9), dtype=mx.bool_))
    block = model.model.layers[-1]
    ref = type(block)._poet_lean_base.__call__(block, x, mask, None)
    assert mx.abs(block(x, mask, None) - ref).max().item() < 1e-5
    assert calls == ["norm_projections", "swiglu_mlp"]


def smollm2_like(layers: int):
    """SmolLM2-135M's widths (576, 1536, 9/3 heads of 64), LoRA on all seven projections of every layer."""
    model = adapted(model_of(layers=layers, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                             num_key_value_heads=3), layers=layers)
    lean_lora.lean_blocks(model)
    x = mx.random.normal((2, 256, 576), key=mx.random.key(3))
    return model, x, mx.random.normal(x.shape, key=mx.random.key(4))


def _kept_for_backward(model, x, cotangent, original: bool) -> int:
    """Bytes the backward keeps: the active memory after evaluating the forward alone, while the gradient's
    (lazy) graph still holds what it needs (eager: no compile)."""
    from mlx.utils import tree_unflatten

    flat = tree_flatten(model.trainable_parameters())

    def forward(*params):
        model.update(tree_unflatten([(k, p) for (k, _), p in zip(flat, params)]))
        h = x
        for block in model.model.layers:
            h = type(block)._poet_lean_base.__call__(block, h, "causal", None) if original else block(h, "causal", None)
        return [h]

    outs, grads = mx.vjp(forward, [v for _, v in flat], [cotangent])
    base = mx.get_active_memory()
    mx.eval(outs)
    kept = mx.get_active_memory() - base - outs[0].nbytes
    mx.eval(grads)
    model.update(tree_unflatten(flat))
    return kept


def test_the_backward_keeps_less():
    """Measured here (floats per token and layer, 4 layers): 8.4K by autodiff, 5.1K lean: the normalized
    inputs of q/k/v and gate/up, SwiGLU's output and the queries are recomputed."""
    model, x, cotangent = smollm2_like(2)
    original = _kept_for_backward(model, x, cotangent, original=True)
    lean = _kept_for_backward(model, x, cotangent, original=False)
    assert lean < 0.65 * original, (lean / 1e6, original / 1e6)


def _peak_over_base(model, x, cotangent, original: bool) -> int:
    block_outputs_and_grads(model, x, cotangent, original, compiled=True)  # trace and compile first
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    block_outputs_and_grads(model, x, cotangent, original, compiled=True)
    return mx.get_peak_memory() - base


def test_a_compiled_step_peaks_lower():
    """Under mx.compile. Without the backward's `mx.depends` (`fast_layers.after_cotangents`), compile merges
    each recomputation with the forward's identical expression and so keeps the very values the lean path frees:
    measured here at 8 layers, peak 183 MB lean against 183 autodiff, with it 119 MB. MLX's run-ahead is
    bounded during the measurement (memory limit 0), so the peak does not depend on thread timing."""
    model, x, cotangent = smollm2_like(8)
    limit = mx.set_memory_limit(0)
    try:
        original = _peak_over_base(model, x, cotangent, original=True)
        lean = _peak_over_base(model, x, cotangent, original=False)
    finally:
        mx.set_memory_limit(limit)
    assert lean < 0.8 * original, (lean / 1e6, original / 1e6)

"""Training end to end on the tiny model: adapters, base weights, resume, determinism, mlx-lm compatibility."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_config
from mlx.utils import tree_flatten

from poet_mlx.reporting import RecordingReporter
from poet_mlx.train.checkpoint import latest_checkpoint, read_metrics
from poet_mlx.train.run import run_training

TRL_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "adapter_change"}


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_dpo_poet_run_writes_mlx_lm_adapters_and_trl_metrics(tiny_model_dir, tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    rec = RecordingReporter()
    summary = run_training(run_config(tiny_model_dir, tiny_data_dir, run, poet=True, steps_per_eval=2), rec)
    assert summary["steps"] == 4 and not summary["interrupted"]
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0}
    assert config["poet_mlx"]["config"]["poet"] is True
    weights = mx.load(str(run / "adapters.safetensors"))
    assert weights and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in weights)
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert TRL_NAMES <= set(train[0])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert "eval_rewards/accuracies" in evals[0]
    # Every step reached the reporter, with a grad norm (so a run that learns nothing shows).
    assert [s[0] for s in rec.of("step")] == [1, 2, 3, 4]
    assert all(np.isfinite(s[2]["grad_norm"]) and s[2]["grad_norm"] > 0 for s in rec.of("step"))
    assert train[-1]["adapter_change"] > 0
    assert rec.of("header")[0]["poet"] is True


def test_base_weights_stay_bit_identical_and_adapters_change(tiny_model_dir, tiny_data_dir, tmp_path):
    from mlx_lm.utils import load

    run = tmp_path / "run"
    run_training(run_config(tiny_model_dir, tiny_data_dir, run))
    base, _ = load(str(tiny_model_dir))
    tuned, _ = load(str(tiny_model_dir), adapter_path=str(run))
    base_w = dict(tree_flatten(base.parameters()))
    tuned_w = dict(tree_flatten(tuned.parameters()))
    for name, w in base_w.items():
        head, leaf = name.rsplit(".", 1)
        twin = tuned_w[name] if name in tuned_w else tuned_w[f"{head}.linear.{leaf}"]  # LoRA wraps the Linear
        assert np.array_equal(np.asarray(w), np.asarray(twin)), name
    lora_b = [v for k, v in tuned_w.items() if k.endswith("lora_b")]
    assert lora_b and any(float(mx.abs(b).max()) > 0 for b in lora_b)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_mlx_lm_generate_loads_our_adapters(tiny_model_dir, tiny_data_dir, tmp_path, fine_tune_type):
    """mlx_lm.load(adapter_path=RUN) and mlx_lm's generate accept our LoRA and DoRA output."""
    from mlx_lm import generate
    from mlx_lm.utils import load

    from poet_mlx.adapters import attach_trainable, lora_parameters
    from poet_mlx.models import load_model

    run = tmp_path / "run"
    run_training(run_config(tiny_model_dir, tiny_data_dir, run, fine_tune_type=fine_tune_type, iters=2))
    model, tok = load(str(tiny_model_dir), adapter_path=str(run))
    text = generate(model, tok, "Tell me about the river.", max_tokens=5)
    assert isinstance(text, str)
    # Same logits as our own model with the saved weights loaded.
    ours, _, _ = load_model(str(tiny_model_dir))
    attach_trainable(ours, fine_tune_type, -1, lora_parameters(4, 20.0, 0.0, None))
    ours.load_weights(str(run / "adapters.safetensors"), strict=False)
    ours.eval()
    x = mx.array([[5, 40, 41, 42, 3]])
    assert np.allclose(np.asarray(model(x)), np.asarray(ours(x)), atol=1e-5)


def test_resume_after_stop_reproduces_uninterrupted_losses(tiny_model_dir, tiny_data_dir, tmp_path):
    full = tmp_path / "full"
    run_training(run_config(tiny_model_dir, tiny_data_dir, full, iters=6, dropout=0.1, save_every=3))
    part = tmp_path / "part"
    steps = {"n": 0}

    def stop_after_three():
        steps["n"] += 1
        return steps["n"] > 3

    summary = run_training(run_config(tiny_model_dir, tiny_data_dir, part, iters=6, dropout=0.1, save_every=3),
                           should_stop=stop_after_three)
    assert summary["interrupted"] and summary["steps"] == 3
    assert latest_checkpoint(part).name == "step-0000003"
    resumed = run_config(tiny_model_dir, tiny_data_dir, part, iters=6, dropout=0.1, save_every=3, resume=True)
    run_training(resumed)
    np.testing.assert_allclose(train_losses(part), train_losses(full), rtol=1e-6)
    a = mx.load(str(full / "adapters.safetensors"))
    b = mx.load(str(part / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-7)


def test_same_seed_same_run_and_reference_cache_reused(tiny_model_dir, tiny_data_dir, tmp_path):
    first, second = RecordingReporter(), RecordingReporter()
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "a"), first)
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "b"), second)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    notes = [p[3] for p in second.of("phase") if p[0].startswith("reference log-probs") and p[3]]
    assert notes == ["reused from cache"] * 2  # train and valid
    first_notes = [p[3] for p in first.of("phase") if p[0].startswith("reference log-probs") and p[3]]
    assert first_notes == ["computed"] * 2


def test_grad_checkpoint_gives_the_same_losses(tiny_model_dir, tiny_data_dir, tmp_path):
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "plain", iters=3))
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "ckpt", iters=3, grad_checkpoint=True))
    np.testing.assert_allclose(train_losses(tmp_path / "ckpt"), train_losses(tmp_path / "plain"), rtol=1e-5)


def test_grad_checkpoint_wraps_every_layer_but_the_last(tiny_model_dir):
    import mlx.core as mx

    from poet_mlx.adapters import enable_grad_checkpoint
    from poet_mlx.models import load_model

    model, _, _ = load_model(str(tiny_model_dir))
    x = mx.array([[5, 9, 13, 2]])
    before = np.array(model(x))
    enable_grad_checkpoint(model)
    wrapped = [getattr(type(layer), "_poet_checkpointed", False) for layer in model.layers]
    assert wrapped == [True] * (len(wrapped) - 1) + [False]
    np.testing.assert_array_equal(np.array(model(x)), before)


def test_grad_accumulation_counts_micro_batches(tiny_model_dir, tiny_data_dir, tmp_path):
    summary = run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "r", iters=2,
                                      grad_accumulation_steps=3, batch_size=2))
    assert summary["steps"] == 2 and summary["pairs_seen"] == 12


@pytest.mark.parametrize("loss", ["simpo", "ipo", "hinge", "robust"])
def test_other_losses_train(tiny_model_dir, tiny_data_dir, tmp_path, loss):
    extra = {"sft_weight": 0.5} if loss == "simpo" else {"label_smoothing": 0.1} if loss == "robust" else {}
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "r", loss=loss, poet=True, iters=3, **extra))
    losses = train_losses(tmp_path / "r")
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_qlora_on_a_4bit_model_learns_and_leaves_the_base_bit_identical(tiny_quant_model_dir, tiny_data_dir,
                                                                          tmp_path, monkeypatch):
    """QLoRA: float32 adapters on 4-bit layers learn (held-out loss falls, reward accuracy rises), and the
    trained model's quantized base (weights, scales, biases) is bit for bit the file's."""
    import mlx.nn as nn

    from poet_mlx.models import load_model
    from poet_mlx.train import trainer as trainer_mod

    trained = {}
    real_fit = trainer_mod.Trainer.fit

    def keep_model(self, resume=False):
        trained["model"] = self.model
        return real_fit(self, resume)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", keep_model)
    run = tmp_path / "r"
    run_training(run_config(tiny_quant_model_dir, tiny_data_dir, run, poet=True, iters=16, steps_per_eval=16))
    evals = [r for r in read_metrics(run) if "eval_loss" in r]
    assert [e["step"] for e in evals] == [0, 16]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05
    assert evals[-1]["eval_rewards/accuracies"] > evals[0]["eval_rewards/accuracies"]
    weights = mx.load(str(run / "adapters.safetensors"))
    assert weights and all(k.endswith(("lora_a", "lora_b")) and w.dtype == mx.float32 for k, w in weights.items())
    fresh, _, _ = load_model(str(tiny_quant_model_dir))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in fresh.named_modules())
    base = dict(tree_flatten(fresh.parameters()))
    after = {k.replace(".linear.", "."): v for k, v in tree_flatten(trained["model"].parameters())
             if not k.endswith(("lora_a", "lora_b"))}
    assert set(after) == set(base)
    for name, w in base.items():
        assert after[name].dtype == w.dtype and np.array_equal(np.asarray(after[name]), np.asarray(w)), name


def test_loss_falls_on_the_demo_task(tiny_model_dir, tiny_data_dir, tmp_path):
    run = tmp_path / "r"
    run_training(run_config(tiny_model_dir, tiny_data_dir, run, iters=24, steps_per_eval=24, poet=True))
    losses = train_losses(run)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    evals = [r for r in read_metrics(run) if "eval_loss" in r]
    assert evals[-1]["eval_rewards/accuracies"] > 0.8


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_adapters_disabled_gives_the_base_model_exactly(tiny_model_dir, tiny_data_dir, tmp_path, fine_tune_type):
    from mlx_lm.utils import load

    from poet_mlx.adapters import adapters_disabled

    run = tmp_path / "run"
    run_training(run_config(tiny_model_dir, tiny_data_dir, run, fine_tune_type=fine_tune_type, iters=2))
    base, _ = load(str(tiny_model_dir))
    tuned, _ = load(str(tiny_model_dir), adapter_path=str(run))
    x = mx.array([[5, 40, 41, 42, 3]])
    with_adapters = np.asarray(tuned(x))
    with adapters_disabled(tuned):
        off = np.asarray(tuned(x))
    assert np.array_equal(off, np.asarray(base(x)))
    assert not np.allclose(with_adapters, off)
    assert np.array_equal(np.asarray(tuned(x)), with_adapters)  # restored


def test_ref_model_scores_the_reference(tiny_model_dir, tiny_data_dir, tmp_path):
    """--ref-model: the reference log-probs come from that model (here the same tokenizer, other weights)."""
    from poet_mlx.demo import task as demo_task
    from poet_mlx.demo import tiny

    other = tiny.save_tiny_model(tmp_path / "other", texts=demo_task.corpus_texts(0), seed=1)
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "self", iters=1, steps_per_eval=1))
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "ref", iters=1, steps_per_eval=1,
                            ref_model=str(other)))
    own = [r for r in read_metrics(tmp_path / "self") if "eval_loss" in r][0]
    ref = [r for r in read_metrics(tmp_path / "ref") if "eval_loss" in r][0]
    assert own["step"] == ref["step"] == 0
    # The policy is the same base model in both runs; only the reference differs.
    assert ref["eval_logps/chosen"] == pytest.approx(own["eval_logps/chosen"], rel=1e-5)
    assert ref["eval_ref_logps/chosen"] != pytest.approx(own["eval_ref_logps/chosen"], rel=1e-3)
    assert own["eval_loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at step 0
    assert abs(ref["eval_loss"] - np.log(2)) > 1e-3


def test_reference_cache_key_sees_weight_content_and_versions(tmp_path, monkeypatch):
    """Fidelity (issue #13): the key hashed the weight files' name, size and mtime only, so a file rewritten with
    the same size and mtime (cp -p, rsync -t, a checkout) reused old numbers; and a poet-mlx / mlx / mlx-lm fix in
    how log-probs are computed (the head path) reused numbers cached before it."""
    import os

    from poet_mlx.data.tokenization import TokenizedPair
    from poet_mlx.train import reference

    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    pairs = [TokenizedPair(np.ones(2, np.int32), np.ones(3, np.int32), np.zeros(3, np.int32), 0)]
    before = reference.cache_key(tmp_path, pairs)
    stat = weights.stat()
    weights.write_bytes(b"\x01" + b"\x00" * 63)  # same size ...
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and mtime
    assert reference.cache_key(tmp_path, pairs) != before
    key = reference.cache_key(tmp_path, pairs)
    monkeypatch.setattr(reference, "software_versions", lambda: "mlx=0 mlx-lm=0 poet-mlx=0")
    assert reference.cache_key(tmp_path, pairs) != key

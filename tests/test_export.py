"""Fuse and PEFT export: key names, shapes and lora_alpha; fused == adapter logits; model card; safety rules;
push to the hub failing cleanly. Adapter folders come from short real training runs on the tiny models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config

IDS = [5, 40, 80, 120, 200, 33, 6, 90, 17, 250, 64, 3]
MODULES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
           "mlp.down_proj": (128, 64)}
"""The tiny llama's adapted modules and their (in, out) sizes: hidden 64, 2 kv heads x 16, intermediate 128."""


def train_run(tmp_path_factory, model_dir, data_dir, name, **overrides):
    """A 2-step SimPO run (no reference pass) with a large learning rate, so the adapters matter."""
    from poet_mlx.train.run import run_training

    run = tmp_path_factory.mktemp(name) / "run"
    settings = dict(iters=2, loss="simpo", learning_rate=1e-2)
    settings.update(overrides)
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: keep any cache out of the user's home
        mp.setenv("POET_MLX_CACHE", str(run.parent / "cache"))
        run_training(run_config(model_dir, data_dir, run, **settings))
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    return train_run(tmp_path_factory, tiny_model_dir, tiny_data_dir, "lora", steps_per_eval=2, poet=True)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    return train_run(tmp_path_factory, tiny_model_dir, tiny_data_dir, "dora", fine_tune_type="dora")


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory, tiny_quant_model_dir, tiny_data_dir):
    return train_run(tmp_path_factory, tiny_quant_model_dir, tiny_data_dir, "qlora")


def logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([IDS])).astype(mx.float32))


def adapter_model(model_dir, run):
    from poet_mlx.adapters import load_adapters
    from poet_mlx.models import load_model

    model, _, _ = load_model(str(model_dir))
    base = logits(model)
    load_adapters(model, run)
    return model, base


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- PEFT export -------------------------------------------------------------------------------------------------
def test_peft_export_keys_shapes_and_alpha(lora_run, tiny_model_dir, tmp_path):
    import mlx.core as mx

    from poet_mlx.export.peft import export_peft

    result = export_peft(lora_run, tmp_path / "peft")
    tensors = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = mx.load(str(lora_run / "adapters.safetensors"))
    r = 4
    expected = set()
    for layer in (0, 1):
        for mod, (d_in, d_out) in MODULES.items():
            path = f"model.layers.{layer}.{mod}"
            a, b = f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"
            expected |= {a, b}
            assert tensors[a].shape == (r, d_in) and tensors[b].shape == (d_out, r)
            assert np.array_equal(np.array(tensors[a]), np.array(ours[f"{path}.lora_a"]).T)
            assert np.array_equal(np.array(tensors[b]), np.array(ours[f"{path}.lora_b"]).T)
    assert set(tensors) == expected
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg == result.config
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 80.0)
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False
    assert cfg["target_modules"] == sorted(m.split(".")[-1] for m in MODULES)
    assert cfg["layers_to_transform"] == [0, 1]
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert any("local path" in w for w in result.warnings)  # a path is useless to others: say so


def test_peft_export_dora_magnitude(dora_run, tmp_path):
    import mlx.core as mx

    from poet_mlx.export.peft import export_peft

    result = export_peft(dora_run, tmp_path / "peft", base_model_id="someone/tiny-llama")
    tensors = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = mx.load(str(dora_run / "adapters.safetensors"))
    key = "base_model.model.model.layers.1.mlp.gate_proj.lora_magnitude_vector"
    assert tensors[key].shape == (128,)
    assert np.array_equal(np.array(tensors[key]), np.array(ours["model.layers.1.mlp.gate_proj.m"]))
    assert len(tensors) == 3 * 2 * len(MODULES)
    assert result.config["use_dora"] is True
    assert result.config["base_model_name_or_path"] == "someone/tiny-llama"
    assert result.warnings == []


def test_peft_export_warns_on_quantized_base(quant_run, tmp_path):
    from poet_mlx.export.peft import export_peft

    result = export_peft(quant_run, tmp_path / "peft")
    text = " ".join(result.warnings)
    assert "4-bit" in text and "fuse" in text and "--dequantize" in text
    assert "transformers cannot load" in text  # no --base-model-id: the recorded base is the quantized one


def test_peft_mapping_refuses_what_peft_cannot_hold():
    import mlx.core as mx

    from poet_mlx.errors import PoetError
    from poet_mlx.export.peft import peft_state_dict

    a, b = mx.zeros((8, 2)), mx.zeros((2, 8))
    tensors, layout = peft_state_dict({"model.layers.3.self_attn.q_proj.lora_a": a,
                                       "model.layers.3.self_attn.q_proj.lora_b": b}, dora=False)
    assert layout.layers == [3] and layout.target_modules == ["q_proj"] and layout.rank == 2
    cases = {
        "fully fine-tuned": {"model.layers.0.self_attn.q_proj.weight": a},
        "mixture-of-experts": {"model.layers.0.mlp.switch_mlp.up_proj.lora_a": mx.zeros((4, 2, 8)),
                               "model.layers.0.mlp.switch_mlp.up_proj.lora_b": mx.zeros((4, 8, 2))},
        "embedding": {"model.layers.0.embed_tokens.lora_a": a, "model.layers.0.embed_tokens.lora_b": b},
        "numbered transformer layer": {"lm_head.lora_a": a, "lm_head.lora_b": b},
        "magnitude": {"model.layers.0.q_proj.lora_a": a, "model.layers.0.q_proj.lora_b": b},
    }
    for why, weights in cases.items():
        with pytest.raises(PoetError, match=why):
            peft_state_dict(weights, dora=why == "magnitude")
    # Modules that differ between layers (an imported adapter's layout): a regex naming exactly those modules
    _, layout = peft_state_dict({"model.layers.0.q_proj.lora_a": a, "model.layers.0.q_proj.lora_b": b,
                                 "model.layers.1.v_proj.lora_a": a, "model.layers.1.v_proj.lora_b": b}, dora=False)
    assert layout.pattern == r"model\.layers\.0\.q_proj|model\.layers\.1\.v_proj"


def test_export_refuses_full_runs_and_never_writes_into_the_run(lora_run, tmp_path):
    import shutil

    from poet_mlx.errors import PoetError
    from poet_mlx.export.peft import export_peft

    full = tmp_path / "full"
    shutil.copytree(lora_run, full)
    cfg = json.loads((full / "adapter_config.json").read_text())
    cfg["fine_tune_type"] = "full"
    (full / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PoetError, match="full fine-tuning run.*--dequantize"):
        export_peft(full, tmp_path / "out")
    with pytest.raises(PoetError, match="never writes there"):
        export_peft(lora_run, lora_run / "peft")


# -- fuse --------------------------------------------------------------------------------------------------------
def test_fused_logits_equal_adapter_logits(lora_run, tiny_model_dir, tmp_path):
    from mlx_lm import load

    from poet_mlx.export.fuse import fuse_run

    model, base = adapter_model(tiny_model_dir, lora_run)
    want = logits(model)
    assert np.abs(want - base).max() > 0.1  # the adapters change the model, so the check below means something
    before = folder_digest(lora_run)
    result = fuse_run(lora_run, tmp_path / "fused")
    assert result.fused_modules == 2 * len(MODULES)
    fused, _ = load(str(tmp_path / "fused"))
    assert type(fused.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    np.testing.assert_allclose(logits(fused), want, atol=1e-4, rtol=1e-4)
    assert folder_digest(lora_run) == before  # the run folder is read, never written


def test_fuse_quantized_base(quant_run, tiny_quant_model_dir, tmp_path):
    """Without --dequantize the fused weight W + scale B^T A^T is quantized again like the base, so each weight
    sits within one quantization step (its group's new scale; MLX's affine quantizer also rounds the group
    offset, so the bound is one step rather than half) of the exact fused weight. Logits move by what that
    rounding does, which has no tight bound on a random tiny model: the weights are checked exactly, the
    logits only for keeping most of the adapters' change. With
    --dequantize nothing is rounded and the logits equal the adapter model's."""
    import mlx.core as mx
    from mlx_lm import load

    from poet_mlx.export.fuse import fuse_run

    model, base = adapter_model(tiny_quant_model_dir, quant_run)
    want = logits(model)
    assert np.abs(want - base).max() > 0.1
    fuse_run(quant_run, tmp_path / "deq", dequantize=True)
    deq, _ = load(str(tmp_path / "deq"))
    assert type(deq.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    np.testing.assert_allclose(logits(deq), want, atol=1e-4, rtol=1e-4)

    fuse_run(quant_run, tmp_path / "q")
    q, _ = load(str(tmp_path / "q"))
    for layer in (0, 1):
        lora = model.layers[layer].mlp.down_proj
        fused = q.model.layers[layer].mlp.down_proj
        assert type(fused).__name__ == "QuantizedLinear" and (fused.bits, fused.group_size) == (4, lora.linear.group_size)
        exact = np.array(mx.dequantize(lora.linear.weight, lora.linear.scales, lora.linear.biases,
                                       lora.linear.group_size, lora.linear.bits)
                         + (lora.scale * lora.lora_b.T) @ lora.lora_a.T)
        got = np.array(mx.dequantize(fused.weight, fused.scales, fused.biases, fused.group_size, fused.bits))
        step = np.repeat(np.abs(np.array(fused.scales)), fused.group_size, axis=1)
        assert np.all(np.abs(got - exact) <= step + 1e-6)
        assert np.abs(got - exact).max() > 1e-4  # it really was rounded again (the quantized layer is new)
    # On the logits the rounding costs part of the change, not most of it (measured: 0.30 vs 1.10).
    change = np.abs(want - base).mean()
    assert np.abs(logits(q) - want).mean() < 0.5 * change


def test_fuse_refuses_to_overwrite_and_is_atomic(lora_run, tmp_path, monkeypatch):
    from poet_mlx.errors import PoetError
    from poet_mlx.export.fuse import fuse_run

    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PoetError, match="not empty.*--force"):
        fuse_run(lora_run, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(PoetError, match="adapter folder"):
        fuse_run(lora_run, lora_run / "fused")
    with pytest.raises(PoetError, match="adapter folder"):  # --force on a parent would delete the run
        fuse_run(lora_run, lora_run.parent, force=True)

    import mlx_lm.utils

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mlx_lm.utils, "save_config", broken)
    with pytest.raises(OSError):
        fuse_run(lora_run, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"  # a failed fuse leaves the old folder as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # and no temporary folder behind
    monkeypatch.undo()
    fuse_run(lora_run, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_model_card(lora_run, tmp_path):
    from poet_mlx.export.fuse import fuse_run

    fuse_run(lora_run, tmp_path / "fused")
    card = (tmp_path / "fused" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card
    for fact in ("SimPO + POET", "beta 2", "gamma 1 (gamma_beta_ratio 0.5)", "POET | yes", "lora, rank 4, scale 20",
                 "2 steps, batch 4", "held-out loss (step 2)", "train rewards/accuracies (step 2)",
                 "measured on pairs cut to equal length"):
        assert fact in card, fact
    metrics = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [m for m in metrics if "eval_loss" in m][-1]
    assert f"| held-out loss (step 2) | {last_eval['eval_loss']:.4g} |" in card


# -- CLI and hub -------------------------------------------------------------------------------------------------
def test_cli_export_and_fuse(lora_run, tmp_path, capsys):
    from poet_mlx.cli.main import main

    assert main(["export", "--adapter-path", str(lora_run), "--out", str(tmp_path / "peft")]) == 0
    out, err = capsys.readouterr()
    assert "lora_alpha 80" in out and "warning: base_model_name_or_path is the local path" in err
    assert main(["export", "--adapter-path", str(lora_run), "--out", str(tmp_path / "peft")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["fuse", "--adapter-path", str(tmp_path / "nothing"), "--save-path", str(tmp_path / "f")]) == 2
    assert "no adapters in" in capsys.readouterr().err


def test_push_offline_fails_after_complete_local_output(lora_run, tmp_path, capsys, monkeypatch):
    from poet_mlx.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "peft"
    code = main(["export", "--adapter-path", str(lora_run), "--out", str(out), "--push-to-hub", "me/tiny"])
    assert code == 2
    err = capsys.readouterr().err
    assert "offline" in err and f"local output in {out} is complete" in err and "hf upload me/tiny" in err
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    assert main(["export", "--adapter-path", str(lora_run), "--out", str(tmp_path / "x"), "--push-to-hub",
                 "not a repo"]) == 2
    assert "owner/name" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_push_to_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from poet_mlx.errors import PoetError
    from poet_mlx.export.hub import push_folder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PoetError, match="not logged in.*HF_TOKEN.*is complete"):
        push_folder(tmp_path, "me/tiny")

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["private"], kw["exist_ok"]))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw["folder_path"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_folder(tmp_path, "me/tiny", private=True, token="hf_x") == "https://huggingface.co/me/tiny"
    assert calls == [("init", "hf_x"), ("create", "me/tiny", True, True), ("upload", "me/tiny", str(tmp_path))]

    class Refused(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise RuntimeError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refused)
    with pytest.raises(PoetError, match="pushing to me/tiny failed.*Unauthorized.*is complete"):
        push_folder(tmp_path, "me/tiny", token="hf_bad")

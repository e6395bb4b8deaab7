"""Adapters in: PEFT LoRA/DoRA folders imported as mlx-lm adapter folders (`poet-mlx import peft`) and used as
the start of a run (`train --init-adapter`). Export -> import gives the same weights and logits; hand-made PEFT
folders (written here with PEFT's names, no peft package needed) give the logits of the merged weights
computed in numpy; what cannot map is refused in one line; a run's reference is base + the init adapter.
PEFT-made adapters (the peft package itself) are checked in test_peft_roundtrip.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, one_error_line, run_config
from test_export import IDS, MODULES, dora_run, logits, lora_run  # noqa: F401  (module fixtures: trained once)


def peft_folder(folder: Path, base, modules: dict, r: int = 4, alpha: float = 8.0, dora: bool = False,
                seed: int = 0, **config) -> Path:
    """A PEFT adapter folder for the tiny llama, as PEFT writes one: `modules` maps module paths to (in, out)."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    tensors = {}
    for path, (d_in, d_out) in modules.items():
        p = f"base_model.model.{path}"
        tensors[f"{p}.lora_A.weight"] = mx.array(rng.normal(0, 0.3, (r, d_in)).astype(np.float32))
        tensors[f"{p}.lora_B.weight"] = mx.array(rng.normal(0, 0.3, (d_out, r)).astype(np.float32))
        if dora:
            tensors[f"{p}.lora_magnitude_vector"] = mx.array(rng.uniform(0.5, 1.5, d_out).astype(np.float32))
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_dora": dora,
           "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
           "target_modules": sorted({p.rsplit(".", 1)[1] for p in modules}), "base_model_name_or_path": str(base),
           "rank_pattern": {}, "alpha_pattern": {}, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def merged_logits(model_dir, folder: Path, scale: float) -> np.ndarray:
    """Logits of the base with W + scale * lora_B @ lora_A (DoRA: rows scaled by m / norm) merged in numpy."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    t = {k: np.array(v) for k, v in mx.load(str(folder / "adapter_model.safetensors")).items()}
    modules = dict(model.named_modules())
    for key in [k for k in t if k.endswith("lora_A.weight")]:
        path = key[len("base_model.model."): -len(".lora_A.weight")]
        w = np.array(modules[path].weight) + scale * t[key.replace("lora_A", "lora_B")] @ t[key]
        m = t.get(key.replace("lora_A.weight", "lora_magnitude_vector"))
        if m is not None:
            w = w * (m / np.linalg.norm(w, axis=1))[:, None]
        modules[path].weight = mx.array(w.astype(np.float32))
    return logits(model)


def tiny_modules(layers, names) -> dict:
    return {f"model.layers.{i}.{n}": MODULES[n] for i in layers for n in names}


# -- export -> import ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_export_then_import_gives_identical_weights_and_logits(kind, request, tiny_model_dir, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    from poet_mlx.export.peft import export_peft
    from poet_mlx.export.run_import import import_peft

    run = request.getfixturevalue(f"{kind}_run")
    export_peft(run, tmp_path / "peft")
    result = import_peft(tmp_path / "peft", tmp_path / "back")
    ours, back = mx.load(str(run / "adapters.safetensors")), mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert set(back) == set(ours)
    assert all(np.array_equal(np.array(back[k]), np.array(ours[k])) for k in ours)
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (cfg["fine_tune_type"], cfg["num_layers"], cfg["lora_parameters"]["rank"], cfg["lora_parameters"]["scale"]) \
        == (kind, 2, 4, 20.0)
    assert result.box.held_at_zero == [] and cfg["model"] == str(tiny_model_dir)
    original, _ = load(str(tiny_model_dir), adapter_path=str(run))
    imported, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "back"))  # mlx-lm's own loader
    assert np.array_equal(logits(imported), logits(original))


def test_import_partial_layout_holds_the_rest_at_zero(tiny_model_dir, tmp_path):
    """q_proj on layer 0 and v_proj on layer 1: mlx-lm's box is both layers x both keys; the two modules the
    adapter lacks stay exactly zero, in mlx_lm.load and in poet-mlx's loader, and export writes the same set."""
    import mlx.core as mx
    from mlx_lm import load

    from poet_mlx.adapters import load_adapters
    from poet_mlx.export.peft import export_peft
    from poet_mlx.export.run_import import import_peft
    from poet_mlx.models import load_model

    modules = {"model.layers.0.self_attn.q_proj": MODULES["self_attn.q_proj"],
               "model.layers.1.self_attn.v_proj": MODULES["self_attn.v_proj"]}
    src = peft_folder(tmp_path / "peft", tiny_model_dir, modules)
    result = import_peft(src, tmp_path / "run")
    assert result.box.num_layers == 2 and result.box.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert result.box.held_at_zero == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]
    want = merged_logits(tiny_model_dir, src, scale=2.0)
    model, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "run"))
    np.testing.assert_allclose(logits(model), want, atol=1e-4, rtol=0)
    assert not np.any(np.array(model.model.layers[1].self_attn.q_proj.lora_b))
    ours, _, _ = load_model(str(tiny_model_dir))
    load_adapters(ours, tmp_path / "run")
    np.testing.assert_allclose(logits(ours), want, atol=1e-4, rtol=0)

    back = export_peft(tmp_path / "run", tmp_path / "peft-again", base_model_id="me/tiny")
    assert back.config["layers_to_transform"] is None  # a regex of the exact paths instead
    assert sorted(modules) == sorted(m for m in dict(model.named_modules()) if _matches(back.config, m))
    again = mx.load(str(tmp_path / "peft-again" / "adapter_model.safetensors"))
    first = mx.load(str(src / "adapter_model.safetensors"))
    assert set(again) == set(first) and all(np.array_equal(np.array(again[k]), np.array(first[k])) for k in first)


def _matches(peft_config: dict, module: str) -> bool:
    import re

    return re.fullmatch(peft_config["target_modules"], module) is not None


@pytest.mark.parametrize("dora", [False, True])
def test_hand_made_peft_folders_import_to_merged_logits(dora, tiny_model_dir, tmp_path):
    """rslora (scale = alpha / sqrt(r)), a uniform rank_pattern, bf16 tensors: the imported adapter's logits are
    those of the merged weights."""
    from mlx_lm import load

    from poet_mlx.export.run_import import import_peft

    src = peft_folder(tmp_path / "peft", tiny_model_dir, tiny_modules([1], ["self_attn.k_proj", "mlp.down_proj"]),
                      dora=dora, use_rslora=True, alpha=6.0, rank_pattern={"k_proj": 4})
    result = import_peft(src, tmp_path / "run")
    assert result.adapter.scale == 3.0 and result.box.num_layers == 1 and result.box.held_at_zero == []
    model, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "run"))
    np.testing.assert_allclose(logits(model), merged_logits(tiny_model_dir, src, 3.0), atol=1e-4, rtol=0)


REFUSALS = {
    "bias": ({"bias": "all"}, "with bias = 'all': it trains the base model's biases"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save = \\['lm_head'\\]: it .*merge_and_unload"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, "Conv1D"),
    "peft_type": ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    "alpha_pattern": ({"alpha_pattern": {"k_proj": 16}}, "different \\(rank, scale\\) pairs"),
    "rank_pattern": ({"rank_pattern": {"k_proj": 8}}, "has rank 4 tensors but its config says r = 8"),
    "dora without m": ({"use_dora": True}, "expected lora_a, lora_b and m"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_cannot_map_is_refused(case, tiny_model_dir, tmp_path):
    from poet_mlx.errors import PoetError
    from poet_mlx.export.run_import import import_peft

    overrides, message = REFUSALS[case]
    src = peft_folder(tmp_path / "peft", tiny_model_dir, tiny_modules([1], ["self_attn.k_proj", "self_attn.v_proj"]),
                      **overrides)
    with pytest.raises(PoetError, match=message):
        import_peft(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_modules_the_model_lacks_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    odd = peft_folder(tmp_path / "odd", tiny_model_dir, {"model.layers.1.self_attn.qkv_proj": (64, 128)})
    assert cli("import", "peft", odd, "--out", tmp_path / "run") == 2
    assert "targets 'model.layers.1.self_attn.qkv_proj', which this model does not have" in \
        one_error_line(capsys.readouterr().err)
    wide = peft_folder(tmp_path / "wide", tiny_model_dir, {"model.layers.1.self_attn.q_proj": (64, 96)})
    assert cli("import", "peft", wide, "--out", tmp_path / "run") == 2
    assert "maps 64 -> 96 features but the model's layer maps 64 -> 64" in one_error_line(capsys.readouterr().err)
    deep = peft_folder(tmp_path / "deep", tiny_model_dir, {"model.layers.7.self_attn.q_proj": (64, 64)})
    assert cli("import", "peft", deep, "--out", tmp_path / "run") == 2
    assert "does not have" in one_error_line(capsys.readouterr().err)
    ok = peft_folder(tmp_path / "ok", tiny_model_dir, tiny_modules([1], ["self_attn.q_proj"]))
    assert cli("import", "peft", ok, "--out", tmp_path / "run") == 0
    assert "imported 1 LoRA modules (rank 4, scale 2)" in capsys.readouterr().out
    assert not list(tmp_path.glob(".run.tmp-*"))


# -- train --init-adapter ---------------------------------------------------------------------------------------------
def test_init_adapter_reference_is_the_policy_at_step_0(lora_run, tiny_model_dir, tiny_data_dir, tmp_path):
    """A plain DPO run first fills the reference cache for the base; the run from the adapter must not reuse it:
    its reference is base + adapter, so at the first step policy == reference and every reward is 0, while the
    policy's log-probs are the adapter's, not the base's."""
    from poet_mlx.export.peft import export_peft
    from poet_mlx.train.run import run_training

    export_peft(lora_run, tmp_path / "peft")
    plain = run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "plain", loss="dpo", iters=1))
    summary = run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "dpo", loss="dpo", iters=1,
                                      init_adapter=str(tmp_path / "peft")))
    first = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()][0]
    base = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()][0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert abs(first["logps/chosen"] - base["logps/chosen"]) > 1.0  # the adapter matters
    notes = " ".join(summary["header"]["notes"])
    assert "reference = the policy at the start (base + the init adapter)" in notes
    assert summary["header"]["rank"] == plain["header"]["rank"] == 4
    cfg = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert cfg["poet_mlx"]["config"]["init_adapter"] == str(tmp_path / "peft")
    assert (cfg["lora_parameters"]["rank"], cfg["lora_parameters"]["scale"], cfg["num_layers"]) == (4, 20.0, 2)


def test_init_adapter_trains_only_the_adapted_modules(tiny_model_dir, tiny_data_dir, tmp_path):
    """An adapter on layer 0 only: the box is both layers; layer 1's LoRA stays frozen at zero and unsaved, and
    the run folder loads in mlx-lm with the same logits as in poet-mlx."""
    import mlx.core as mx
    from mlx_lm import load

    from poet_mlx.errors import PoetError
    from poet_mlx.train.run import run_training

    src = peft_folder(tmp_path / "peft", tiny_model_dir, tiny_modules([0], ["self_attn.q_proj", "mlp.up_proj"]))
    with pytest.raises(PoetError, match="--keys .* differs from the init adapter's .* drop --keys"):
        run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "x", loss="simpo", iters=1,
                                init_adapter=str(src), keys=["self_attn.q_proj"]))
    summary = run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", loss="simpo", iters=2,
                                      learning_rate=1e-2, num_layers=None, init_adapter=str(src)))
    assert "held at zero" in " ".join(summary["header"]["notes"])
    saved = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    assert sorted(saved) == sorted(f"{p}.{leaf}" for p in tiny_modules([0], ["self_attn.q_proj", "mlp.up_proj"])
                                   for leaf in ("lora_a", "lora_b"))
    first = mx.load(str(src / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.lora_b"
    assert not np.allclose(np.array(saved[key]), np.array(first[f"base_model.model.{key[:-7]}.lora_B.weight"]).T)
    model, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "run"))
    assert not np.any(np.array(model.model.layers[1].mlp.up_proj.lora_b))


def test_init_adapter_run_resumes(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """Stopped after one step and resumed: the saved settings are the adapter's, so the resumed run rebuilds the
    same layout (held modules included) and reaches the losses of an uninterrupted run."""
    from poet_mlx.train.run import run_training

    src = peft_folder(tmp_path / "peft", tiny_model_dir, tiny_modules([0], ["self_attn.q_proj", "mlp.up_proj"]))
    settings = dict(loss="dpo", iters=3, num_layers=None, init_adapter=str(src), save_every=1)
    whole = run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "whole", **settings))
    steps = iter([False, True])
    run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "cut", **settings),
                 should_stop=lambda: next(steps, True))
    assert cli("train", "--adapter-path", tmp_path / "cut", "--resume", "--plain") == 0
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x and "eval_loss" not in x] for r in ("whole", "cut")]
    assert whole["header"]["num_layers"] == 2 and len(losses[0]) == len(losses[1]) == 3
    np.testing.assert_allclose(losses[1][-1], losses[0][-1], rtol=1e-5)


def test_reference_cache_key_names_the_init_adapter_only_when_it_is_attached(tiny_model_dir, tiny_data_dir,
                                                                             tmp_path):
    """eval (or anything scoring the bare base) with init_adapter in its settings stores the base's reference
    under the base's key; the training policy with the adapter attached stores it under the adapter's key."""
    from poet_mlx.adapters import attach_trainable, lora_parameters
    from poet_mlx.batching import pair_set
    from poet_mlx.config import DataConfig
    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import tokenize_pairs
    from poet_mlx.models import load_model
    from poet_mlx.reporting import Reporter
    from poet_mlx.train import reference

    src = peft_folder(tmp_path / "peft", tiny_model_dir, tiny_modules([1], ["self_attn.q_proj"]))
    cfg = run_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", loss="dpo", init_adapter=str(src))
    model, tok, path = load_model(str(tiny_model_dir))
    rows, _ = load_split(DataConfig(data=str(tiny_data_dir)), "valid")
    pairs, _ = tokenize_pairs(rows[:4], tok, 128, 32)
    plain, init = reference.cache_key(path, pairs), reference.cache_key(path, pairs, str(src))
    reference.fill_reference({"x": pair_set(pairs, cfg.loss)}, cfg, model, path, tok, Reporter())
    assert sorted(p.stem for p in reference.cache_dir().glob("*.npz")) == [plain]
    attach_trainable(model, "lora", 1, lora_parameters(4, 2.0, 0.0, ["self_attn.q_proj"]))
    reference.fill_reference({"x": pair_set(pairs, cfg.loss)}, cfg, model, path, tok, Reporter())
    assert sorted(p.stem for p in reference.cache_dir().glob("*.npz")) == sorted([plain, init])


def test_init_adapter_from_an_mlx_lm_folder(lora_run, tiny_model_dir, tiny_data_dir, tmp_path):
    """A poet-mlx / mlx-lm adapter folder starts a run as well: same layout, reference = base + those adapters."""
    from poet_mlx.train.run import run_training

    summary = run_training(run_config(tiny_model_dir, tiny_data_dir, tmp_path / "dpo", loss="dpo", iters=1,
                                      init_adapter=str(lora_run)))
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert summary["header"]["notes"][0].startswith(f"starting from the mlx-lm LoRA adapter {lora_run}")


def test_eval_of_a_run_from_an_init_adapter_scores_against_that_start(lora_run, tiny_model_dir, tiny_data_dir,
                                                                      tmp_path):
    """The held-out reference of such a run is base + the init adapter, as in training: a run that has not moved
    from its start (learning rate ~0) has rewards ~0, where scoring against the bare base would not."""
    from poet_mlx.analysis.evaluate import run_evaluation
    from poet_mlx.export.peft import export_peft
    from poet_mlx.train.run import run_training

    export_peft(lora_run, tmp_path / "peft")
    run = tmp_path / "still"
    run_training(run_config(tiny_model_dir, tiny_data_dir, run, iters=1, learning_rate=1e-12,
                            init_adapter=str(tmp_path / "peft")))
    means, _ = run_evaluation(run_config(tiny_model_dir, tiny_data_dir, "unused"), str(run))
    assert abs(means["rewards/chosen"]) < 1e-3 and abs(means["rewards/rejected"]) < 1e-3
    bare, _ = run_evaluation(run_config(tiny_model_dir, tiny_data_dir, "unused"), str(lora_run))
    assert abs(bare["rewards/chosen"]) > 1e-2  # a run from the base is scored against the base: it moved


def test_fresh_adapters_reference_pass_scores_the_base(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """With fresh adapters (LoRA's B is zero) and no init adapter, the policy's reference pass scores the base
    itself (`adapters_disabled`: none of the adapters' compute), and gets what the fresh adapters give, to float32
    rounding."""
    from poet_mlx.adapters import attach_trainable, lora_parameters
    from poet_mlx.batching import pair_set
    from poet_mlx.config import DataConfig
    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import tokenize_pairs
    from poet_mlx.models import load_model
    from poet_mlx.reporting import Reporter
    from poet_mlx.scoring import pair_token_logps
    from poet_mlx.train import reference

    cfg = run_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", loss="dpo")
    model, tok, path = load_model(str(tiny_model_dir))
    attach_trainable(model, "lora", 2, lora_parameters(4, 2.0, 0.0, None))
    rows, _ = load_split(DataConfig(data=str(tiny_data_dir)), "valid")
    pairs, _ = tokenize_pairs(rows[:4], tok, 128, 32)
    with_adapters, _ = pair_token_logps(model, pairs, 4)
    disabled = []
    real = reference.adapters_disabled
    monkeypatch.setattr(reference, "adapters_disabled", lambda m: disabled.append(m) or real(m))
    sets = {"x": pair_set(pairs, cfg.loss)}
    reference.fill_reference(sets, cfg, model, path, tok, Reporter())
    assert disabled == [model]
    for ours, theirs in zip(sets["x"].ref, with_adapters):
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # bit for bit here

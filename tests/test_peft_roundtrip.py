"""The real round trip into the Hugging Face stack: exported PEFT adapters and dequantized fused models load
with peft/transformers (torch, float32) and give the MLX model's logits.

Needs the optional extra: `pip install -e ".[peft]"`. Skipped, with the reason, where torch, transformers or
peft is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PEFT round trip needs torch (pip install -e '.[peft]')")
transformers = pytest.importorskip("transformers", reason="the PEFT round trip needs transformers")
peft = pytest.importorskip("peft", reason="the PEFT round trip needs peft (pip install -e '.[peft]')")

# The run fixtures are imported so that pytest finds them here too (module scope: trained once per module).
from test_export import IDS, adapter_model, dora_run, logits, lora_run, quant_run  # noqa: E402,F401

TOL = 1e-4


def hf_logits(model) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits.float().numpy()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_adapters_match_mlx(kind, request, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from poet_mlx.export.peft import export_peft

    run = request.getfixturevalue(f"{kind}_run")
    model, _ = adapter_model(tiny_model_dir, run)
    want = logits(model)
    export_peft(run, tmp_path / "peft", base_model_id="poet-mlx/tiny-llama")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    before = hf_logits(base)
    assert np.abs(before - want).max() > 0.1  # the adapters matter, so a match below is not a coincidence
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    cfg = peft_model.peft_config["default"]
    assert cfg.use_dora == (kind == "dora") and cfg.lora_alpha / cfg.r == 20.0
    np.testing.assert_allclose(hf_logits(peft_model), want, atol=TOL, rtol=0)


def test_dequantized_fuse_loads_in_transformers(request, tiny_quant_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from poet_mlx.export.fuse import fuse_run

    quant_run = request.getfixturevalue("quant_run")
    model, _ = adapter_model(tiny_quant_model_dir, quant_run)
    fuse_run(quant_run, tmp_path / "fused", dequantize=True)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fused"), dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(hf), logits(model), atol=TOL, rtol=0)


PEFT_MADE = {
    # layers_to_transform [0] of 2: not "the last N layers", so layer 1 is held at zero in mlx-lm's layout
    "lora-layer-0": dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0]),
    "dora-rslora-all-linear": dict(target_modules="all-linear", use_dora=True, use_rslora=True),
    "regex": dict(target_modules=r".*\.layers\.1\.(self_attn\.k_proj|mlp\.gate_proj)"),
}


@pytest.mark.parametrize("case", sorted(PEFT_MADE))
def test_peft_made_adapters_import_with_peft_logits(case, tiny_model_dir, tmp_path):
    """An adapter made and saved by PEFT itself (random A and B, DoRA magnitudes moved off their init) imports
    into an mlx-lm folder whose logits (mlx_lm.load with adapter_path) are PEFT's within 1e-4."""
    from mlx_lm import load
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from poet_mlx.export.run_import import import_peft

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    before = hf_logits(base)
    made = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, task_type="CAUSAL_LM",
                                           **PEFT_MADE[case]))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
    want = hf_logits(made)
    assert np.abs(want - before).max() > 0.1
    made.save_pretrained(str(tmp_path / "peft"))
    result = import_peft(tmp_path / "peft", tmp_path / "run", model=str(tiny_model_dir))
    assert result.adapter.dora == ("dora" in case)
    model, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "run"))
    np.testing.assert_allclose(logits(model), want, atol=TOL, rtol=0)


def test_partial_layout_exports_back_to_peft(tiny_model_dir, tmp_path):
    """An imported layer-0-only adapter, exported again: PEFT loads the regex form onto exactly those modules and
    gives the MLX logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from poet_mlx.export.peft import export_peft
    from poet_mlx.export.run_import import import_peft

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    made = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules=["q_proj", "up_proj"], layers_to_transform=[0]))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    want = hf_logits(made)
    made.save_pretrained(str(tmp_path / "peft"))
    import_peft(tmp_path / "peft", tmp_path / "run", model=str(tiny_model_dir))
    export_peft(tmp_path / "run", tmp_path / "again", base_model_id="poet-mlx/tiny-llama")
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "again"))
    adapted = sorted(n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert adapted == [f"base_model.model.model.layers.0.{m}" for m in ("mlp.up_proj", "self_attn.q_proj")]
    np.testing.assert_allclose(hf_logits(loaded), want, atol=TOL, rtol=0)

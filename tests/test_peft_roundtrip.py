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

"""GGUF out: `export --format gguf` (a llama.cpp LoRA GGUF) and `fuse --format gguf` (the base GGUF with the
adapters merged), for runs trained on a GGUF file.

The independent reader is gguf-py's GGUFReader (llama.cpp's own Python package): names, shapes (ggml ne
order), dtypes and alpha are read back, and applying the read tensors to the base GGUF's tensors the way
llama.cpp's build_lora_mm does (W + alpha / r * B A), then undoing the q/k permutation with the helper's own
`llama_permute` and gguf-py's tensor-name table, reproduces the adapter model's logits. The merged GGUF is
loaded back through poet-mlx's GGUF loader. A real llama.cpp build (slow, skipped without one): its logits of
base + --lora and of the merged file against MLX's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf_helpers as H
import numpy as np
import pytest
from conftest import cli, one_error_line
from test_export import lora_run, train_run  # noqa: F401  (module fixture)

gguf = pytest.importorskip("gguf")

IDS = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 1]
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_gguf(path: Path, arch: str = "llama", qtype: str = "F32", seed: int = 0) -> Path:
    tok = H.train_tokenizer("smollm")
    cfg = {**H.CONFIGS[arch], "vocab_size": tok.get_vocab_size()}
    H.write_model_gguf(path, arch, H.build_model(cfg, seed=seed), cfg, tok, default_type=qtype)
    return path


@pytest.fixture(scope="module")
def gguf_runs(tmp_path_factory, tiny_data_dir):
    """Short SimPO runs trained on tiny llama GGUFs: LoRA on F32 and on Q8_0 weights, DoRA on F32."""
    folder = tmp_path_factory.mktemp("gguf_models")
    f32, q8 = write_gguf(folder / "llama-f32.gguf"), write_gguf(folder / "llama-q8.gguf", qtype="Q8_0")
    return {"f32": (f32, train_run(tmp_path_factory, f32, tiny_data_dir, "gguf-lora")),
            "q8": (q8, train_run(tmp_path_factory, q8, tiny_data_dir, "gguf-q8")),
            "dora": (f32, train_run(tmp_path_factory, f32, tiny_data_dir, "gguf-dora", fine_tune_type="dora"))}


def logits_of(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def adapted_logits(model_path, run) -> tuple:
    from poet_mlx.adapters import load_adapters
    from poet_mlx.models import load_model

    model, _, _ = load_model(str(model_path))
    base = logits_of(model)
    load_adapters(model, run)
    return logits_of(model), base


def hf_name_of(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor, from gguf-py's own name table (not poet-mlx's)."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for layer in (0, 1):
        for hf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{hf}"
            if tmap.get_name(name) + ".weight" == gguf_name:
                return name + ".weight"
    raise KeyError(gguf_name)


def unpermute(rows: np.ndarray, gguf_name: str) -> np.ndarray:
    """GGUF rows -> Hugging Face rows for llama q/k (the inverse of the helper's llama_permute)."""
    heads = {"attn_q": H.CONFIGS["llama"]["num_attention_heads"], "attn_k": H.CONFIGS["llama"]["num_key_value_heads"]}
    stem = gguf_name.split(".")[2]
    if stem not in heads:
        return rows
    return rows[np.argsort(H.llama_permute(np.arange(rows.shape[0]), heads[stem]))]


def fields_of(reader) -> dict:
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


# -- the LoRA GGUF ----------------------------------------------------------------------------------------------
def test_lora_gguf_metadata_names_shapes(gguf_runs, tmp_path):
    _, run = gguf_runs["f32"]
    from poet_mlx.export.gguf_lora import export_gguf_lora

    result = export_gguf_lora(run, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "adapter.gguf"))
    meta = fields_of(reader)
    assert (meta["general.architecture"], meta["general.type"], meta["adapter.type"]) == ("llama", "adapter", "lora")
    assert meta["adapter.lora.alpha"] == pytest.approx(80.0) and result.alpha == 80.0  # scale 20 x rank 4
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"blk.{i}.{s}.weight.lora_{ab}" for i in (0, 1) for s in LINEAR for ab in "ab"}
    base = {t.name: t for t in gguf.GGUFReader(str(gguf_runs["f32"][0])).tensors}
    for name, t in tensors.items():
        ne_in, ne_out = (int(d) for d in base[name[: -len(".lora_a")]].shape)  # ggml ne: (in, out)
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(int(d) for d in t.shape) == ((ne_in, 4) if name.endswith("lora_a") else (4, ne_out))
    assert result.checked_against == gguf_runs["f32"][0] and result.warnings == []


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_lora_gguf_applied_to_the_base_reproduces_adapted_logits(kind, gguf_runs, tmp_path):
    """W + alpha / r * B A on the base GGUF's own tensors, un-permuted by the test's helper, gives the logits of
    the MLX model with its adapters."""
    import mlx.core as mx

    from poet_mlx.export.gguf_lora import export_gguf_lora
    from poet_mlx.models import load_model

    base_file, run = gguf_runs[kind]
    want, before = adapted_logits(base_file, run)
    assert np.abs(want - before).max() > 0.1
    export_gguf_lora(run, tmp_path / "adapter.gguf")
    lora = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "adapter.gguf")).tensors}
    alpha = float(fields_of(gguf.GGUFReader(str(tmp_path / "adapter.gguf")))["adapter.lora.alpha"])
    model, _, _ = load_model(str(base_file))
    new = []
    for t in gguf.GGUFReader(str(base_file)).tensors:
        if f"{t.name}.lora_a" not in lora:
            continue
        w = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(
            [int(d) for d in reversed(list(t.shape))])  # (out, in): numpy order of ggml ne (in, out)
        a, b = lora[f"{t.name}.lora_a"], lora[f"{t.name}.lora_b"]  # (r, in), (out, r)
        merged = unpermute(w + alpha / a.shape[0] * (b @ a), t.name)
        new.append((hf_name_of(t.name), mx.array(merged.astype(np.float32))))
    model.load_weights(new, strict=False)  # quantized layers are replaced by float ones
    assert len(new) == 14
    np.testing.assert_allclose(logits_of(_dequantized(model, new)), want, atol=2e-4, rtol=0)


def _dequantized(model, weights):
    """A float model holding `weights` (an 8-bit base loads quantized; its adapted layers become Linear)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    modules = dict(model.named_modules())
    layers = []
    for name, w in weights:
        path = name[: -len(".weight")]
        if isinstance(modules[path], nn.QuantizedLinear):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = w
            layers.append((path, lin))
    if layers:
        model.update_modules(tree_unflatten(layers))
    mx.eval(model.parameters())
    return model


def test_qk_rows_are_permuted_like_llama_cpp_and_phi3_parts_split():
    """Pure mapping: llama q/k lora_b rows in llama.cpp's order; v untouched; qwen2 unpermuted; a Phi-3 base that
    keeps q/k/v apart gets one (A, rows of B) per part."""
    from poet_mlx.export.gguf_lora import GGUFTarget, gguf_lora_parts
    from poet_mlx.gguf.arch import ARCHITECTURES

    rng = np.random.default_rng(0)
    a, bq, bv = (rng.normal(size=s).astype(np.float32) for s in ((64, 4), (4, 64), (4, 32)))
    adapters = {"model.layers.1.self_attn.q_proj.lora_a": a, "model.layers.1.self_attn.q_proj.lora_b": bq,
                "model.layers.1.self_attn.v_proj.lora_a": a, "model.layers.1.self_attn.v_proj.lora_b": bv}
    llama = gguf_lora_parts(adapters, GGUFTarget("llama", ARCHITECTURES["llama"], 4, 2, 16))
    np.testing.assert_array_equal(llama["blk.1.attn_q.weight"].b, H.llama_permute(bq.T, 4))
    np.testing.assert_array_equal(llama["blk.1.attn_q.weight"].a, a.T)
    np.testing.assert_array_equal(llama["blk.1.attn_v.weight"].b, bv.T)
    qwen = gguf_lora_parts(adapters, GGUFTarget("qwen2", ARCHITECTURES["qwen2"], 4, 2, 16))
    np.testing.assert_array_equal(qwen["blk.1.attn_q.weight"].b, bq.T)

    bqkv = rng.normal(size=(4, 64 + 2 * 32)).astype(np.float32)
    fused = {"model.layers.0.self_attn.qkv_proj.lora_a": a, "model.layers.0.self_attn.qkv_proj.lora_b": bqkv}
    phi3 = ARCHITECTURES["phi3"]
    kept = gguf_lora_parts(fused, GGUFTarget("phi3", phi3, 4, 2, 16, base_shapes={"blk.0.attn_qkv.weight": (64, 128)}))
    assert list(kept) == ["blk.0.attn_qkv.weight"]
    apart = {f"blk.0.{p}.weight": (64, n) for p, n in (("attn_q", 64), ("attn_k", 32), ("attn_v", 32))}
    split = gguf_lora_parts(fused, GGUFTarget("phi3", phi3, 4, 2, 16, base_shapes=apart))
    np.testing.assert_array_equal(np.concatenate([split[k].b for k in apart]), bqkv.T)
    assert all(np.array_equal(split[k].a, a.T) for k in apart)


def test_refusals_and_warnings(gguf_runs, lora_run, tmp_path, capsys):
    from poet_mlx.errors import PoetError
    from poet_mlx.export.gguf_lora import export_gguf_lora

    _, dora = gguf_runs["dora"]
    assert cli("export", "--adapter-path", dora, "--format", "gguf", "--out", tmp_path / "d.gguf") == 2
    assert "llama.cpp's LoRA GGUF holds LoRA adapters only" in one_error_line(capsys.readouterr().err)
    # a run on a Hugging Face folder: written, with a warning that nothing checked it against a base GGUF
    result = export_gguf_lora(lora_run, tmp_path / "hf.gguf")
    assert result.arch == "llama" and result.checked_against is None and "--base-gguf" in result.warnings[0]
    qwen = write_gguf(tmp_path / "qwen2.gguf", arch="qwen2")
    with pytest.raises(PoetError, match="is a 'qwen2' model but the run's base is 'llama'"):
        export_gguf_lora(lora_run, tmp_path / "x.gguf", base_gguf=str(qwen))
    with pytest.raises(PoetError, match="exists; pass --force"):
        export_gguf_lora(lora_run, tmp_path / "hf.gguf")
    with pytest.raises(PoetError, match="inside the adapter folder"):
        export_gguf_lora(lora_run, lora_run / "a.gguf")
    assert cli("fuse", "--adapter-path", lora_run, "--format", "gguf", "--save-path", tmp_path / "m.gguf") == 2
    assert "is not a .gguf file: pass --base-gguf" in one_error_line(capsys.readouterr().err)
    f32, run = gguf_runs["f32"]
    assert cli("export", "--adapter-path", run, "--format", "gguf", "--out", tmp_path / "ok.gguf") == 0
    out = capsys.readouterr().out
    assert f"llama-cli -m {f32} --lora {tmp_path / 'ok.gguf'}" in out and "checked against" in out
    assert cli("fuse", "--adapter-path", run, "--format", "gguf", "--save-path", tmp_path / "m.gguf") == 0
    assert "merged the adapters into 14 tensors" in capsys.readouterr().out and (tmp_path / "m.gguf").is_file()
    assert cli("fuse", "--adapter-path", run, "--format", "gguf", "--save-path", f32) == 2
    assert "exists; pass --force" in one_error_line(capsys.readouterr().err)


# -- the merged GGUF -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["f32", "q8", "dora"])
def test_fused_gguf_loads_back_with_the_adapted_logits(kind, gguf_runs, tmp_path):
    """Metadata and every tensor without an adapter are copied as they were (quantization included); the
    adapted tensors are F32 on an F32 base, F16 otherwise; poet-mlx's GGUF loader reads the file back to the
    adapter model's logits (F16 rounding on the 8-bit base)."""
    from poet_mlx.export.gguf_fuse import fuse_gguf
    from poet_mlx.models import load_model

    base_file, run = gguf_runs[kind]
    want, before = adapted_logits(base_file, run)
    result = fuse_gguf(run, tmp_path / "merged.gguf")
    assert result.merged == 14 and result.base_gguf == base_file
    base, merged = gguf.GGUFReader(str(base_file)), gguf.GGUFReader(str(tmp_path / "merged.gguf"))
    fb, fm = fields_of(base), fields_of(merged)
    assert {k: v for k, v in fm.items() if k != "general.file_type"} == \
        {k: v for k, v in fb.items() if k != "general.file_type"}
    bt = {t.name: t for t in base.tensors}
    for t in merged.tensors:
        if t.name.split(".")[-2] in LINEAR:
            want_type = "F32" if kind != "q8" else "F16"
            assert t.tensor_type.name == want_type
        else:
            assert t.tensor_type == bt[t.name].tensor_type
            assert np.array_equal(np.array(t.data), np.array(bt[t.name].data))
    model, _, _ = load_model(str(tmp_path / "merged.gguf"))
    tol = 1e-4 if kind != "q8" else 0.05 * np.abs(want - before).max()
    np.testing.assert_allclose(logits_of(model), want, atol=tol, rtol=0)


# -- llama.cpp itself (slow; needs a llama.cpp cmake build) -----------------------------------------------------------
LLAMA_CPP_BUILD = os.environ.get("LLAMA_CPP_BUILD", "/tmp/gguf-work/llama-build")
HELPER = Path(__file__).parent / "llama_cpp" / "llama_logits.cpp"


def llama_cpp_source() -> Path:
    """The llama.cpp source tree of the cmake build in LLAMA_CPP_BUILD (its CMakeCache names it)."""
    cache = Path(LLAMA_CPP_BUILD) / "CMakeCache.txt"
    if not cache.is_file():
        pytest.skip(f"no llama.cpp cmake build in {LLAMA_CPP_BUILD} (set LLAMA_CPP_BUILD)")
    return Path(next(line.split("=", 1)[1] for line in cache.read_text().splitlines()
                     if line.startswith("CMAKE_HOME_DIRECTORY")))


def llama_logits_binary(tmp_path_factory) -> Path:
    """Compile tests/llama_cpp/llama_logits.cpp against the llama.cpp build's static libraries (seconds)."""
    build, src = Path(LLAMA_CPP_BUILD), llama_cpp_source()
    libs = [build / "src/libllama.a", build / "ggml/src/libggml.a", build / "ggml/src/libggml-cpu.a",
            build / "ggml/src/libggml-base.a"]
    if not all(p.is_file() for p in libs):
        pytest.skip(f"the llama.cpp build in {build} has no static libraries (BUILD_SHARED_LIBS=OFF)")
    out = tmp_path_factory.mktemp("llama_cpp") / "llama_logits"
    subprocess.run(["g++", "-O2", "-std=c++17", str(HELPER), f"-I{src}/include", f"-I{src}/ggml/include",
                    *map(str, libs), "-fopenmp", "-lpthread", "-ldl", "-o", str(out)], check=True)
    return out


def llama_cpp_logits(binary: Path, model: Path, lora, ids) -> np.ndarray:
    out = binary.parent / "logits.f32"
    subprocess.run([str(binary), str(model), str(lora or "-"), str(out), *map(str, ids)], check=True,
                   capture_output=True)
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)


@pytest.mark.slow
def test_llama_cpp_runs_the_adapter_and_the_merged_file(gguf_runs, tmp_path_factory, tmp_path):
    from poet_mlx.export.gguf_fuse import fuse_gguf
    from poet_mlx.export.gguf_lora import export_gguf_lora

    binary = llama_logits_binary(tmp_path_factory)
    base_file, run = gguf_runs["f32"]
    want, before = adapted_logits(base_file, run)
    export_gguf_lora(run, tmp_path / "adapter.gguf")
    fuse_gguf(run, tmp_path / "merged.gguf")
    base = llama_cpp_logits(binary, base_file, None, IDS)
    with_lora = llama_cpp_logits(binary, base_file, tmp_path / "adapter.gguf", IDS)
    merged = llama_cpp_logits(binary, tmp_path / "merged.gguf", None, IDS)
    # measured: 8e-6, 1.0e-5 and 1.1e-5, for an adapter that moves the logits by 25
    np.testing.assert_allclose(base, before, atol=1e-4, rtol=0)
    np.testing.assert_allclose(with_lora, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged, want, atol=1e-4, rtol=0)
    print(json.dumps({"base": float(np.abs(base - before).max()), "lora": float(np.abs(with_lora - want).max()),
                      "merged": float(np.abs(merged - want).max()), "effect": float(np.abs(want - before).max())}))


@pytest.mark.slow
def test_lora_gguf_is_what_convert_lora_to_gguf_writes(gguf_runs, tmp_path):
    """llama.cpp's own converter, fed the run's PEFT export, writes the very same tensors (names, shapes, types,
    bytes) and adapter keys."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys

    from poet_mlx.export.gguf_lora import export_gguf_lora
    from poet_mlx.export.peft import export_peft
    from poet_mlx.gguf import gguf_cache_folder

    src = llama_cpp_source()
    base_file, run = gguf_runs["f32"]
    export_peft(run, tmp_path / "peft", base_model_id="poet-mlx/tiny-llama")
    subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(gguf_cache_folder(base_file)),
                    "--outtype", "f32", "--outfile", str(tmp_path / "ref.gguf"), str(tmp_path / "peft")],
                   check=True, capture_output=True, cwd=src)
    export_gguf_lora(run, tmp_path / "ours.gguf")
    ref, ours = gguf.GGUFReader(str(tmp_path / "ref.gguf")), gguf.GGUFReader(str(tmp_path / "ours.gguf"))
    a, b = {t.name: t for t in ref.tensors}, {t.name: t for t in ours.tensors}
    assert set(a) == set(b)
    for name, t in a.items():
        assert list(t.shape) == list(b[name].shape) and t.tensor_type == b[name].tensor_type
        assert np.array_equal(np.array(t.data), np.array(b[name].data)), name
    fa, fb = fields_of(ref), fields_of(ours)
    assert all(fa[k] == fb[k] for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"))

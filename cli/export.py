"""`poet-mlx export`: the run's adapters as a Hugging Face PEFT adapter folder (--format peft) or a llama.cpp LoRA
GGUF file (--format gguf) for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse
import sys

from poet_mlx.cli.common import add_output_flags, run_guarded
from poet_mlx.cli.fuse import add_hub_flags, push_if_asked


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx export", description=(
        "Write a run's adapters elsewhere. --format peft: LoRA/DoRA as adapter_config.json + "
        "adapter_model.safetensors that peft.PeftModel.from_pretrained loads on the Hugging Face base model, with "
        "a model card. --format gguf: LoRA as one llama.cpp LoRA GGUF file (llama-cli -m base.gguf --lora FILE; "
        "an Ollama Modelfile ADAPTER line; LM Studio)."))
    p.add_argument("--adapter-path", required=True, help="The run folder.")
    p.add_argument("--out", required=True, help="peft: folder to write into (must be new or empty); gguf: the "
                   ".gguf file to write.")
    p.add_argument("--format", default="peft", choices=["peft", "gguf"], help="Export format (default: peft).")
    p.add_argument("--base-model-id", help="peft: base_model_name_or_path to record: the Hugging Face id of the "
                   "full-precision model (default: the run's model).")
    p.add_argument("--base-gguf", help="gguf: the base GGUF the adapter will run on, to check tensor names and "
                   "shapes against (default: the run's model when it is a .gguf file).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    add_hub_flags(p)
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _export(args), debug=args.debug)


def _export(args) -> int:
    from poet_mlx.errors import PoetError
    from poet_mlx.export.hub import check_repo_id

    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    flag = {"peft": "--base-gguf", "gguf": "--base-model-id"}[args.format]
    if getattr(args, flag[2:].replace("-", "_")):
        raise PoetError(f"{flag} does not apply to --format {args.format}")
    say = (lambda *a: None) if args.quiet else print
    if args.format == "gguf":
        return _export_gguf(args, say)
    from poet_mlx.export.peft import export_peft

    result = export_peft(args.adapter_path, args.out, base_model_id=args.base_model_id, force=args.force)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    c = result.config
    targets = c["target_modules"] if isinstance(c["target_modules"], str) else ", ".join(c["target_modules"])
    say(f"exported {result.tensors} tensors in PEFT format to {result.path}")
    say(f"  base_model_name_or_path {c['base_model_name_or_path']}, r {c['r']}, lora_alpha {c['lora_alpha']:g}, "
        f"use_dora {str(c['use_dora']).lower()}")
    say(f"  target_modules {targets}; layers_to_transform {c['layers_to_transform']}")
    push_if_asked(args, result.path, say)
    return 0


def _export_gguf(args, say) -> int:
    from poet_mlx.errors import PoetError
    from poet_mlx.export.gguf_lora import export_gguf_lora

    if args.push_to_hub:
        raise PoetError("--push-to-hub uploads folders (peft); upload the .gguf file with `hf upload REPO FILE`")
    result = export_gguf_lora(args.adapter_path, args.out, base_gguf=args.base_gguf, force=args.force)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    base = result.checked_against or "BASE.gguf"
    say(f"exported {result.tensors} tensors as a llama.cpp LoRA GGUF ({result.arch}, r {result.rank}, "
        f"alpha {result.alpha:g}) to {result.path}"
        + (f"; names and shapes checked against {result.checked_against}" if result.checked_against else ""))
    say(f"  llama.cpp: llama-cli -m {base} --lora {result.path}")
    say(f"  Ollama Modelfile: FROM {base} / ADAPTER {result.path}")
    return 0

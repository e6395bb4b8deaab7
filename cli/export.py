"""`poet-mlx export --format peft`: the run's adapters as a Hugging Face PEFT adapter folder."""

from __future__ import annotations

import argparse
import sys

from poet_mlx.cli.common import add_output_flags, run_guarded
from poet_mlx.cli.fuse import add_hub_flags, push_if_asked


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx export", description=(
        "Write a run's LoRA/DoRA adapters as adapter_config.json + adapter_model.safetensors in PEFT's format "
        "(peft.PeftModel.from_pretrained loads them on the Hugging Face base model), with a model card."))
    p.add_argument("--adapter-path", required=True, help="The run folder.")
    p.add_argument("--out", required=True, help="Folder to write the export into (must be new or empty).")
    p.add_argument("--format", default="peft", choices=["peft"], help="Export format (default: peft).")
    p.add_argument("--base-model-id", help="base_model_name_or_path to record: the Hugging Face id of the "
                   "full-precision model (default: the run's model).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    add_hub_flags(p)
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _export(args), debug=args.debug)


def _export(args) -> int:
    from poet_mlx.export.hub import check_repo_id
    from poet_mlx.export.peft import export_peft

    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    say = (lambda *a: None) if args.quiet else print
    result = export_peft(args.adapter_path, args.out, base_model_id=args.base_model_id, force=args.force)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    c = result.config
    say(f"exported {result.tensors} tensors in PEFT format to {result.path}")
    say(f"  base_model_name_or_path {c['base_model_name_or_path']}, r {c['r']}, lora_alpha {c['lora_alpha']:g}, "
        f"use_dora {str(c['use_dora']).lower()}")
    say(f"  target_modules {', '.join(c['target_modules'])}; layers_to_transform {c['layers_to_transform']}")
    push_if_asked(args, result.path, say)
    return 0

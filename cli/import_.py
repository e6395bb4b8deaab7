"""`poet-mlx import peft PEFT_DIR --out RUN`: a Hugging Face PEFT LoRA/DoRA adapter as an mlx-lm adapter folder
(the inverse of `poet-mlx export --format peft`)."""

from __future__ import annotations

import argparse
import sys

from poet_mlx.cli.common import add_output_flags, run_guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx import", description=(
        "Write a Hugging Face PEFT LoRA/DoRA adapter (adapter_config.json + adapter_model.safetensors) as an "
        "mlx-lm adapter folder: mlx_lm.load(model, adapter_path=RUN), poet-mlx chat/eval/fuse/export and "
        "`poet-mlx train --init-adapter RUN` load it. (train --init-adapter also takes the PEFT folder itself.)"))
    p.add_argument("format", choices=["peft"], help="What to import (peft).")
    p.add_argument("source", help="The PEFT adapter folder.")
    p.add_argument("--out", required=True, help="Folder to write the adapter into (must be new or empty).")
    p.add_argument("--model", help="Base model the adapter goes on: a folder, .gguf file, catalog name or hub id "
                   "(default: the adapter's base_model_name_or_path).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the repository.")
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _import(args), debug=args.debug)


def _import(args) -> int:
    from poet_mlx.export.run_import import import_peft

    say = (lambda *a: None) if args.quiet else print
    result = import_peft(args.source, args.out, model=args.model, force=args.force,
                         trust_remote_code=args.trust_remote_code)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    a, box = result.adapter, result.box
    say(f"imported {len(a.modules)} {'DoRA' if a.dora else 'LoRA'} modules (rank {a.rank}, scale {a.scale:g}) "
        f"for {result.base_model}: {result.path}")
    say(f"  mlx-lm layout: the last {box.num_layers} layers x {', '.join(box.keys)}"
        + (f"; {len(box.held_at_zero)} of those modules are not in the adapter and stay at zero"
           if box.held_at_zero else ""))
    say(f"  next: poet-mlx train --model {result.base_model} --init-adapter {result.path} --data DATA ...")
    return 0

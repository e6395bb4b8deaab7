"""`poet-mlx fuse`: a standalone model with the adapters fused in (optionally dequantized for transformers)."""

from __future__ import annotations

import argparse
import sys

from poet_mlx.cli.common import add_output_flags, run_guarded


def add_hub_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hub")
    g.add_argument("--push-to-hub", metavar="REPO", help="Then upload the folder to this Hugging Face repo "
                   "(owner/name; token from HF_TOKEN or `hf auth login`).")
    g.add_argument("--private", action="store_true", help="Create the hub repo as private.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx fuse", description=(
        "Fuse a run's LoRA/DoRA adapters into its base model and save a model folder that mlx_lm.load loads, "
        "with a model card (README.md) of the training. The run folder is never written to."))
    p.add_argument("--adapter-path", required=True, help="The run folder (adapters.safetensors + adapter_config.json).")
    p.add_argument("--save-path", required=True, help="Folder to write the model into (must be new or empty); "
                   "with --format gguf, the .gguf file to write.")
    p.add_argument("--format", default="mlx", choices=["mlx", "gguf"], help="mlx (default): an mlx-lm model "
                   "folder. gguf: the base GGUF with the adapters merged in (llama.cpp, Ollama, LM Studio).")
    p.add_argument("--base-gguf", help="gguf: the GGUF to merge into (default: the run's model when it is a "
                   ".gguf file).")
    p.add_argument("--model", help="Base model (default: the one the run was trained on).")
    p.add_argument("--dequantize", action="store_true", help="Write full-precision weights (a quantized base is "
                   "dequantized): Hugging Face safetensors that transformers loads.")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --save-path.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow tokenizers that run repository code.")
    add_hub_flags(p)
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _fuse(args), debug=args.debug)


def push_if_asked(args, folder, say) -> None:
    from poet_mlx.export.hub import push_folder

    if args.push_to_hub:
        say(f"pushing {folder} to {args.push_to_hub}{' (private)' if args.private else ''} ...")
        say(f"pushed: {push_folder(folder, args.push_to_hub, private=args.private)}")


def _fuse_gguf(args, say) -> int:
    from poet_mlx.errors import PoetError
    from poet_mlx.export.gguf_fuse import fuse_gguf

    given = [f for f, v in (("--model", args.model), ("--dequantize", args.dequantize),
                            ("--push-to-hub", args.push_to_hub)) if v]
    if given:
        raise PoetError(f"{given[0]} does not apply to --format gguf (it merges into --base-gguf, F16/F32)")
    result = fuse_gguf(args.adapter_path, args.save_path, base_gguf=args.base_gguf, force=args.force)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    say(f"merged the adapters into {result.merged} tensors of {result.base_gguf} (F16, F32 where the base was F32; "
        f"every other tensor copied as it was): {result.path}")
    say(f"  llama.cpp: llama-cli -m {result.path}")
    return 0


def _fuse(args) -> int:
    from poet_mlx.errors import PoetError
    from poet_mlx.export.fuse import fuse_run
    from poet_mlx.export.hub import check_repo_id

    say = (lambda *a: None) if args.quiet else print
    if args.format == "gguf":
        return _fuse_gguf(args, say)
    if args.base_gguf:
        raise PoetError("--base-gguf applies to --format gguf only")
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # before minutes of work, not after
    result = fuse_run(args.adapter_path, args.save_path, model=args.model, dequantize=args.dequantize,
                      force=args.force, trust_remote_code=args.trust_remote_code)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if result.dequantized:
        kind = "full-precision weights (mlx_lm.load and transformers load it)"
    elif result.quantization:
        kind = (f"{result.quantization.get('bits')}-bit like the base (the fused weights are rounded again, so "
                "replies differ slightly from base + adapters; --dequantize keeps them exact and gives a model "
                "transformers loads)")
    else:
        kind = "weights in the base's precision"
    say(f"fused {result.fused_modules} adapter layers into {result.base_model}: {result.path}, {kind}")
    say(f"model card: {result.path / 'README.md'}")
    push_if_asked(args, result.path, say)
    return 0

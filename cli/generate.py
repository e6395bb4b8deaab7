"""`poet-mlx generate`: replies for one prompt or a file of prompts, as JSONL, for scripts."""

from __future__ import annotations

import argparse
import json
import sys

from poet_mlx.cli.chat import add_model_flags, add_sampling_flags, sampling_from, template_kwargs
from poet_mlx.cli.common import add_output_flags, run_guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx generate", description=(
        "Generate a reply for each prompt (one user turn through the chat template) and write one JSON object "
        'per prompt: {"prompt", "reply", "tokens", "tokens_per_second", "finish_reason"}.'))
    add_model_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="One prompt.")
    src.add_argument("--prompts", metavar="FILE", help='A .jsonl file of {"prompt": ...} objects, or any other '
                     "text file with one prompt per non-empty line.")
    p.add_argument("--output", help="Write the JSONL here (default: stdout, one line per prompt as it finishes).")
    add_sampling_flags(p, temperature=0.0, max_tokens=256)
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _generate(args), debug=args.debug)


def _generate(args) -> int:
    from poet_mlx.fsutil import write_text_atomic
    from poet_mlx.generate.chat import generate_replies, load_for_chat, read_prompts

    sampling = sampling_from(args)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    loaded = load_for_chat(args.model, args.adapter_path, args.trust_remote_code, template_kwargs(args))
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    lines = []
    for record in generate_replies(loaded.model, loaded.tokenizer, prompts, sampling, args.system,
                                   template_kwargs=template_kwargs(args)):
        line = json.dumps(record, ensure_ascii=False)
        if args.output:
            lines.append(line + "\n")
        else:
            print(line, flush=True)
    if args.output:
        write_text_atomic(args.output, "".join(lines))
        if not args.quiet:
            print(f"wrote {len(lines)} replies to {args.output}", file=sys.stderr)
    return 0

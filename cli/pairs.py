"""`poet-mlx pairs`: on-policy preference pairs from a model's own replies, judged (best vs worst)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from poet_mlx.cli.chat import add_model_flags, template_kwargs
from poet_mlx.cli.common import add_output_flags, graceful_stop, run_guarded
from poet_mlx.cli.ui import make_reporter


def build_parser() -> argparse.ArgumentParser:
    from poet_mlx.analysis.judges import JUDGE_HELP

    p = argparse.ArgumentParser(prog="poet-mlx pairs", description=(
        "Sample --samples replies per prompt from the model (with --adapter-path, the trained one), score them "
        "with --judge, and write chosen = best, rejected = worst as a TRL conversational preference file, with "
        "the scores and settings in each row. Ties and pairs under --min-margin are skipped and counted. An "
        "interrupted run continues where it stopped when started again with the same settings."))
    add_model_flags(p)
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help='A .jsonl file of {"prompt": TEXT or messages, ...} rows (other fields are copied).')
    p.add_argument("--judge", required=True, help=JUDGE_HELP + "; e.g. poet_mlx.analysis.constraints:judge.")
    p.add_argument("--out", required=True, metavar="FILE", help="The pairs file to write (.jsonl).")
    p.add_argument("--samples", type=int, default=4, help="Replies sampled per prompt (default: 4).")
    p.add_argument("--samples-out", metavar="FILE", help="Also write every judged reply (pair or not) to this .jsonl.")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="Keep a pair only when best - worst score is at least this (default: 0: any difference).")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (default: 1.0).")
    g.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: 1.0).")
    g.add_argument("--max-tokens", type=int, default=128, help="Most tokens per reply (default: 128).")
    g.add_argument("--seed", type=int, default=0, help="Seed of the replies (default: 0).")
    g.add_argument("--batch-size", type=int, default=None,
                   help="Replies generated together (default: up to 64, fewer when their KV cache would pass 1 GiB).")
    p.add_argument("--overwrite", action="store_true", help="Start --out over instead of continuing it.")
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _pairs(args), debug=args.debug)


def _pairs(args) -> int:
    from poet_mlx.analysis.judges import load_judge
    from poet_mlx.generate.chat import load_for_chat
    from poet_mlx.generate.pairs import PairsOptions, build_pairs, read_prompt_rows

    opts = PairsOptions(args.samples, args.max_tokens, args.temperature, args.top_p, args.seed, args.min_margin,
                        args.batch_size, args.system, args.chat_template_config)
    opts.check()
    rows = read_prompt_rows(args.prompts)
    judge = load_judge(args.judge)
    settings = {"model": args.model, "adapter_path": args.adapter_path, "judge": args.judge,
                "prompts": str(args.prompts), "prompts_sha256": _sha256(args.prompts), "samples": opts.samples,
                "max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
                "seed": opts.seed, "min_margin": opts.min_margin, "system": opts.system,
                "chat_template_config": opts.chat_template_config}
    with graceful_stop() as stop:
        with make_reporter(args.plain, args.quiet, title="poet-mlx pairs", stop=stop) as reporter:
            reporter.phase("loading model", 0, None)
            loaded = load_for_chat(args.model, args.adapter_path, args.trust_remote_code, template_kwargs(args))
            reporter.phase("loading model", 1, 1)
            settings["model"] = loaded.model_ref
            summary = build_pairs(loaded.model, loaded.tokenizer, rows, judge, opts, args.out, settings, reporter,
                                  stop, overwrite=args.overwrite, samples_out=args.samples_out)
    if not args.quiet:
        _print_summary(summary)
    return stop.exit_code if summary.interrupted else 0


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def _print_summary(s) -> None:
    skipped = ", ".join(f"{n} {why}" for why, n in s.skipped.items() if n) or "none"
    rate = f"{s.reply_tokens / s.seconds:.1f} reply tokens/s" if s.seconds else "-"
    print(f"{s.pairs} pairs from {s.done}/{s.prompts} prompts in {s.out} (skipped: {skipped}); "
          f"{s.replies} replies, {s.reply_tokens} tokens, {rate}")
    if s.interrupted:
        print(f"stopped early: run the same command again to continue from prompt {s.done}")

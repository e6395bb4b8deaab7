"""CLI flags generated from the config dataclasses: one field = one YAML key = one flag (`_` -> `-`)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from poet_mlx.config import GROUPS, RunConfig, field_types, load_yaml, validate
from poet_mlx.errors import PoetError


def add_config_flags(parser: argparse.ArgumentParser, groups=tuple(GROUPS), skip=()) -> None:
    """Add a flag for every field of the named config groups. Defaults are SUPPRESSed so that only flags
    the user typed override the YAML file (and the dataclass defaults show in --help)."""
    for group in groups:
        klass = GROUPS[group]
        section = parser.add_argument_group(f"{group} settings")
        types = field_types(klass)
        for f in fields(klass):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            help_text = f.metadata.get("help", "")
            if default not in (None, "", False) and types[f.name] is not bool:
                help_text += f" (default: {default})"
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
            ftype = types[f.name]
            if ftype is bool:
                section.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            elif ftype is list:
                item = f.metadata.get("item", str)
                section.add_argument(flag, nargs="+", type=item, metavar="X" if item is float else "NAME", **kwargs)
            else:
                choices, nargs = f.metadata.get("choices"), f.metadata.get("nargs")
                metavar = "NAME" if nargs else None if choices else f.name.upper()
                section.add_argument(flag, type=ftype, choices=choices, metavar=metavar, nargs=nargs, **kwargs)


def given_flags(args: argparse.Namespace, groups=tuple(GROUPS)) -> dict:
    """The config keys the user set on the command line."""
    names = {f.name for g in groups for f in fields(GROUPS[g])}
    return {k: v for k, v in vars(args).items() if k in names}


def build_config(args: argparse.Namespace, need_data: bool = True) -> RunConfig:
    """Defaults < YAML file (-c) < flags; validated before anything heavy loads."""
    cfg = RunConfig()
    if getattr(args, "config", None):
        cfg.update(load_yaml(args.config), source=str(args.config))
    cfg.update(given_flags(args), source="command line")
    validate(cfg, need_data=need_data)
    return cfg


RESUMABLE_CHANGES = {"resume", "adapter_path", "iters", "epochs", "steps_per_report", "steps_per_eval", "save_every",
                     "skip_nonfinite"}


def resume_config(saved: dict, given: dict) -> RunConfig:
    """The config of a run being resumed: its saved settings, plus the few that may change on resume.

    A resumed run continues exactly only with the settings it started with, so any other difference the
    user asked for is an error rather than silently ignored.
    """
    if given.get("overwrite"):
        raise PoetError("--resume and --overwrite exclude each other: --resume continues the run, --overwrite "
                        "starts it over; pick one")
    cfg = RunConfig.from_flat(saved, source="saved run config")
    asked = RunConfig.from_flat(given, source="command line").to_flat()
    conflicts = [f"{k}: the run has {saved.get(k)!r}, asked {asked[k]!r}" for k in given
                 if k not in RESUMABLE_CHANGES and saved.get(k) != asked[k]]
    if conflicts:
        raise PoetError("--resume continues a run with its own settings; these differ: " + "; ".join(conflicts)
                        + ". Drop them, or start a new run with another --adapter-path")
    cfg.update({k: asked[k] for k in given if k in RESUMABLE_CHANGES}, source="command line")
    cfg.train.resume, cfg.train.overwrite = True, False
    validate(cfg)
    return cfg

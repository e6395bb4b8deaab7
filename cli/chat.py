"""`poet-mlx chat`: a terminal chat with the aligned model; `--compare` puts the base model's reply beside it."""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from poet_mlx.cli.common import add_output_flags, run_guarded


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Model folder or Hugging Face id (default: the base model of --adapter-path).")
    p.add_argument("--adapter-path", help="A run folder: talk to the model with its adapters.")
    p.add_argument("--system", help="System prompt.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow tokenizers that run repository code.")
    p.add_argument("--chat-template-config", metavar="JSON", help="Extra arguments of the chat template, as mlx-lm "
                   'takes them, e.g. \'{"enable_thinking": false}\' for Qwen3-style templates.')


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"Sampling temperature; 0 is greedy (default: {temperature}).")
    g.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass; 1 keeps all (default: 1.0).")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"Most tokens per reply (default: {max_tokens}).")
    g.add_argument("--seed", type=int, help="Random seed, for replies that repeat across runs.")


def template_kwargs(args) -> dict:
    from poet_mlx.config import parse_template_config

    return parse_template_config(args.chat_template_config, "--chat-template-config")


def sampling_from(args):
    from poet_mlx.generate.chat import Sampling

    s = Sampling(args.temperature, args.top_p, args.max_tokens, args.seed)
    s.check()
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx chat", description=(
        "Chat in the terminal with a model and its adapters: streamed replies, the model's chat template, "
        "multi-turn history. Commands: /reset, /system TEXT, /save FILE, /help, /exit. Ctrl-C stops a "
        "reply, Ctrl-D leaves."))
    add_model_flags(p)
    p.add_argument("--compare", action="store_true", help="Answer every prompt twice, by the base model "
                   "(adapters off) and by the aligned model, side by side.")
    add_sampling_flags(p, temperature=0.7, max_tokens=512)
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None, *, read_line: Optional[Callable[[], str]] = None, console=None) -> int:
    """`read_line` (raises EOFError at the end) and `console` (a rich Console) replace the terminal in tests."""
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _chat(args, read_line, console), debug=args.debug)


def _chat(args, read_line, console) -> int:
    from rich.console import Console

    from poet_mlx.errors import PoetError
    from poet_mlx.generate.chat import ChatSession, load_for_chat

    sampling = sampling_from(args)
    if args.compare and not args.adapter_path:
        raise PoetError("--compare shows the base and the aligned model side by side: pass --adapter-path RUN")
    console = console or Console(highlight=False)
    with console.status("loading model"):
        loaded = load_for_chat(args.model, args.adapter_path, args.trust_remote_code, template_kwargs(args))
    if args.compare and loaded.fine_tune_type == "full":
        raise PoetError(f"{args.adapter_path} is a full fine-tuning run: there are no adapters to switch off for "
                        "--compare. Chat with the base model alone with --model")
    info = {"model": loaded.model_ref, "adapter_path": loaded.adapter_path}
    session = ChatSession(loaded.model, loaded.tokenizer, has_adapters=loaded.adapter_path is not None,
                          compare=args.compare, system=args.system, sampling=sampling, info=info,
                          template_kwargs=template_kwargs(args))
    _header(console, loaded, session)
    read_line = read_line or _terminal_reader(console)
    live = console.is_terminal and not args.plain
    while True:
        try:
            line = read_line().strip()
        except EOFError:
            console.print()
            break
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-C stops a reply; Ctrl-D or /exit leaves)[/]")
            continue
        if not line:
            continue
        result = session.command(line)
        if result is not None:
            style = "red" if result.error else "dim"
            console.print(result.text, style=style, markup=False)
            if result.exit:
                break
            continue
        streams = session.ask(line)
        if args.compare and live:
            _show_side_by_side(console, streams, session)
        else:
            _show_in_turn(console, streams, session)
    return 0


def _terminal_reader(console) -> Callable[[], str]:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    import sys

    def read_line() -> str:
        line = console.input("[bold green]you ›[/] ")
        if not sys.stdin.isatty():  # piped input is not echoed by a terminal: show it, so the transcript reads well
            console.print(line, markup=False, highlight=False)
        return line

    return read_line


def _header(console, loaded, session) -> None:
    from rich.panel import Panel

    s = session.sampling
    what = f"[bold]{loaded.model_ref}[/]"
    if loaded.adapter_path:
        what += f" + adapters [bold]{loaded.adapter_path}[/] ({loaded.fine_tune_type})"
    if session.compare:
        what += "\n[cyan]compare[/]: every prompt is answered by the base model (adapters off) and the aligned one"
    numbers = (f"temperature {s.temperature} · top-p {s.top_p} · max {s.max_tokens} tokens"
               + (f" · seed {s.seed}" if s.seed is not None else ""))
    body = f"{what}\n{numbers}\n[dim]/help for commands · Ctrl-C stops a reply · Ctrl-D or /exit leaves[/]"
    for note in loaded.notes:
        body += f"\n[yellow]note:[/] {note}"
    console.print(Panel(body, title="poet-mlx chat", title_align="left", expand=False))
    if session.system:
        console.print(f"[dim]system prompt:[/] {session.system}", highlight=False)


def _label(variant: str) -> tuple[str, str]:
    return {"aligned": ("aligned", "bold cyan"), "base": ("base", "bold magenta")}[variant]


def numbers_line(reply, interrupted: bool = False) -> str:
    text = f"{reply.tokens} tokens · {reply.tokens_per_second:.1f} tokens/s"
    if interrupted or reply.finish_reason == "interrupted":
        text += " · stopped"
    elif reply.finish_reason == "length":
        text += " · reached --max-tokens"
    return text


def _show_in_turn(console, streams, session) -> None:
    """Stream each reply as plain text, one after the other (single chat, or --compare without a live screen)."""
    from rich.text import Text

    for i, stream in enumerate(streams):
        name, style = _label(stream.reply.variant)
        console.print(Text(f"{name} › ", style=style), end="")
        try:
            for piece in stream:
                console.out(piece, end="", highlight=False)
                console.file.flush()
        except KeyboardInterrupt:
            stream.close()
            for rest in streams[i + 1:]:
                rest.close()
            console.print()
            console.print(numbers_line(stream.reply, True), style="dim")
            return
        console.print()
        console.print(numbers_line(stream.reply), style="dim")


def _show_side_by_side(console, streams, session) -> None:
    """Both replies in one table, filled live: the base column first, then the aligned one."""
    from rich import box
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    texts = [Text() for _ in streams]

    def render() -> Table:
        t = Table(box=box.ROUNDED, expand=True, show_footer=True)
        for stream, text in zip(streams, texts):
            name, style = _label(stream.reply.variant)
            title = f"{name} · adapters off" if name == "base" else f"{name} · {session.info.get('adapter_path')}"
            footer = numbers_line(stream.reply) if stream.started else ""
            t.add_column(Text(title, style=style), footer=Text(footer, style="dim"), ratio=1)
        t.add_row(*texts)
        return t

    with Live(render(), console=console, refresh_per_second=10) as live:
        try:
            for stream, text in zip(streams, texts):
                for piece in stream:
                    text.append(piece)
                    live.update(render())
        except KeyboardInterrupt:
            for stream in streams:
                stream.close()
        live.update(render())

"""What `poet-mlx demo` prints: the side-by-side table, a few replies before and after, and what it all says."""

from __future__ import annotations

from pathlib import Path

SHOWN_KS = (1, 2, 4, 8, 16)
REPLY_CHARS = 220


def _rate(r) -> str:
    if not r or r.get("rate") is None:
        return "-"
    return f"{100 * r['rate']:.0f}% [{100 * r['low']:.0f}-{100 * r['high']:.0f}]"


def print_results(res: dict, path: Path) -> None:
    from rich.console import Console

    c = Console(highlight=False)
    if not c.is_terminal:  # logs and pipes: wide enough for the table's four columns
        c = Console(highlight=False, width=150)
    if res["interrupted"]:
        c.print("[yellow]stopped early[/]: run the same command again to continue (finished stages are reused).")
        return
    c.print(comparison(res))
    for ex in res.get("examples", []):
        c.print(f"\n[bold]held-out prompt:[/] {ex['prompt']}")
        for label, r in ex["replies"].items():
            marks = " ".join("met" if m else "missed" for m in r["met"])
            text = " ".join(r["reply"].split())
            text = text if len(text) <= REPLY_CHARS else text[:REPLY_CHARS] + "..."
            c.print(f"  [dim]{label:9s}[/] ({marks}) {text}")
    c.print()
    for line in reading(res):
        c.print(line)
    print(f"files:\n  {path}\n  {Path(res['folder']) / 'base' / 'samples.jsonl'} (and each run's heldout/samples.jsonl)")
    runs = res["runs"]
    print(f"next:\n  poet-mlx chat --adapter-path {runs[-1]['path']} --compare" if runs else "")


def comparison(res: dict):
    """One column per model (the start, then each run), one row per measurement."""
    from rich.table import Table

    base, runs = res["base"], res["runs"]
    spec = res["spec"]
    t = Table(title=f"{spec['heldout_prompts']} held-out prompts x {spec['heldout_samples']} replies each "
                    f"(tasks unseen in training); {res['train_pairs']['pairs']} on-policy training pairs; "
                    "[95% Wilson intervals]",
              title_justify="left", title_style="bold")
    t.add_column("")
    t.add_column("start", justify="right")
    for r in runs:
        t.add_column(r["label"], justify="right")

    def row(name, cell):
        t.add_row(name, cell(base, None), *[cell(r["heldout"], r) for r in runs])

    row(f"replies meeting all their instructions (of {base['all_met']['n']})", lambda h, r: _rate(h["all_met"]))
    for tag, name in (("opening", "  instructions decided by the opening"), ("end", "  ... decided by the end"),
                      ("whole", "  ... decided by the whole reply")):
        n = (base["by"].get(tag) or {}).get("n", 0)
        row(f"{name} (of {n})", lambda h, r, tag=tag: _rate(h["by"].get(tag)))
    row("mean reply length (tokens)", lambda h, r: f"{h['mean_tokens']:.0f}")
    row("replies that end (not cut at the limit)", lambda h, r: f"{100 * h['finished']:.0f}%")
    if runs and "curve" in runs[0]:
        curve = runs[0]["curve"]
        row(f"reward accuracy, held-out pairs (n={curve['full']['pairs']})",
            lambda h, r: "-" if r is None else f"{r['curve']['full']['accuracy']:.2f}")
        for i, k in enumerate(curve["k"]):
            if k in SHOWN_KS and curve["pairs"][i]:
                row(f"  ... on the first {k} token{'s' if k > 1 else ''}",
                    lambda h, r, i=i: "-" if r is None else f"{r['curve']['accuracy'][i]:.2f}")
    row("training", lambda h, r: "-" if r is None else f"{r['steps']} steps, {r['train_seconds']:.0f} s"
        + (" (reused)" if r.get("reused") else ""))
    return t


def _delta(after: dict, before: dict) -> tuple[float, bool]:
    """(change of rate, whether the two 95% intervals overlap)."""
    overlap = after["low"] <= before["high"] and before["low"] <= after["high"]
    return after["rate"] - before["rate"], overlap


def reading(res: dict) -> list[str]:
    """What the numbers say, written from them (so the text cannot claim what the run did not show)."""
    base, runs, lines = res["base"], res["runs"], []
    for r in runs:
        d, overlap = _delta(r["heldout"]["all_met"], base["all_met"])
        sure = "within the intervals' overlap, so not settled by this run" if overlap else "intervals apart"
        lines.append(f"{r['label']}: held-out replies meeting all instructions {100 * base['all_met']['rate']:.0f}% "
                     f"-> {100 * r['heldout']['all_met']['rate']:.0f}% ({100 * d:+.0f} points; {sure}); replies "
                     f"{base['mean_tokens']:.0f} -> {r['heldout']['mean_tokens']:.0f} tokens.")
    shortest = min((r["heldout"]["mean_tokens"] for r in runs), default=base["mean_tokens"])
    if shortest < 0.7 * base["mean_tokens"]:
        lines.append(f"Replies got much shorter ({base['mean_tokens']:.0f} -> {shortest:.0f} tokens at the least): short "
                     "replies meet 'at most N words' and 'no commas' more easily, and the pairs prefer a finished "
                     "reply to one cut at the limit; read gains on whole-reply instructions with that in mind.")
    for i in range(0, len(runs) - 1, 2):  # each loss, then the same loss with POET
        lines.append(_poet_vs_plain(runs[i], runs[i + 1]))
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in res["stage_seconds"].items())
    lines.append(f"Time: {res['seconds']:.0f} s in all ({stages}). Model from {res['model_source']}; "
                 f"seed {res['spec']['seed']}. On Apple silicon (Metal) every stage runs many times faster.")
    return lines


def _poet_vs_plain(dpo: dict, poet: dict) -> str:
    parts = []
    for tag in ("opening", "end"):
        a, b = dpo["heldout"]["by"].get(tag), poet["heldout"]["by"].get(tag)
        if a and b and a["n"]:
            d, overlap = _delta(b, a)
            parts.append(f"decided by the {tag} {100 * a['rate']:.0f}% vs {100 * b['rate']:.0f}% ({100 * d:+.0f}"
                         f"{', overlapping intervals' if overlap else ''})")
    d, overlap = _delta(poet["heldout"]["all_met"], dpo["heldout"]["all_met"])
    verdict = ("did better" if d > 0 else "did worse" if d < 0 else "did the same") + (
        " here, but the intervals overlap: a larger run (benchmarks/alignment.py) is needed to tell" if overlap
        else ", with intervals apart")
    return (f"{poet['label']} vs {dpo['label']} on held-out replies: all instructions met "
            f"{100 * dpo['heldout']['all_met']['rate']:.0f}% "
            f"vs {100 * poet['heldout']['all_met']['rate']:.0f}%; " + "; ".join(parts) + f". POET {verdict}.")

"""`poet-mlx demo --tiny`: what the toy demo prints (a tiny model, a synthetic task, DPO vs DPO+POET)."""

from __future__ import annotations

from pathlib import Path


def run_toy(args, stop_flag_factory, make_reporter) -> int:
    """Run the toy demo with the command's flags; returns the exit code."""
    from dataclasses import replace

    from poet_mlx.demo.toy import RESULTS_FILE, DemoSpec, run_demo

    given = {"steps": args.steps, "sft_steps": args.sft_steps, "generate": args.generate, "task": args.task,
             "seed": args.seed}
    spec = replace(DemoSpec(), **{k: v for k, v in given.items() if v is not None})
    spec.check()
    folder = Path(args.folder)
    if not args.quiet:
        _intro(spec, folder)
    with stop_flag_factory() as stop:
        with make_reporter(args.plain, args.quiet, title="poet-mlx demo --tiny", stop=stop) as reporter:
            results = run_demo(folder, spec, (False, True) if args.poet else (False,), reporter, stop)
    if not args.quiet:
        _print_results(results, folder / RESULTS_FILE)
    return stop.exit_code if results["interrupted"] else 0


def _intro(spec, folder: Path) -> None:
    from poet_mlx.demo.task import TASKS

    c, r = TASKS[spec.task]["chosen"], TASKS[spec.task]["rejected"]
    print(f"poet-mlx demo in {folder}/: a tiny llama ({spec.num_layers} layers, width {spec.hidden_size}) and a "
          f"synthetic task, '{spec.task}'. A reply is preferred when it opens helpfully rather than with a refusal; "
          f"after the opening, chosen replies add {c[0]}-{c[1]} and rejected ones {r[0]}-{r[1]} filler sentences. "
          f"Steps: SFT ({spec.sft_steps} steps), DPO and DPO+POET ({spec.steps} steps each, same start and "
          f"settings), then scoring {spec.valid_pairs} held-out pairs and judging replies to "
          f"{spec.generate} held-out prompts.", flush=True)


def _print_results(res: dict, path: Path) -> None:
    from rich.console import Console

    from poet_mlx.analysis.prefix import PrefixCurve
    from poet_mlx.cli.evaluate import prefix_table

    c = Console()
    runs = res["runs"]
    if res["interrupted"]:
        c.print(f"[yellow]stopped early[/]: {', '.join(r['label'] for r in runs)} trained; nothing was scored.")
        return
    c.print(_comparison(res))
    c.print(prefix_table([PrefixCurve.from_json(r["curve"]) for r in runs]))
    for line in reading(res):
        c.print(line)
    files = [str(path)] + ([str(Path(res["folder"]) / "samples.jsonl")] if "generation" in res["base"] else [])
    files += [str(Path(r["path"]) / "prefix_curve.json") for r in runs]
    # Plain prints: paths and the command stay on one line each, to copy.
    print("files:\n  " + "\n  ".join(files))
    print(f"next:\n  poet-mlx eval --model {res['sft_model']} --data {res['data']} --adapter-path "
          f"{runs[0]['path']}" + "".join(f" --compare {r['path']}" for r in runs[1:]) + " --no-poet "
          "--prefix-curve --entropy --generate 16 --judge poet_mlx.demo.task:judge")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _comparison(res: dict):
    """One column per model (SFT start, then each run), one row per measurement."""
    from rich.table import Table

    runs, base = res["runs"], res["base"]
    t = Table(title=f"{res['spec']['valid_pairs']} held-out pairs and {res['spec']['generate']} held-out prompts",
              title_justify="left", title_style="bold")
    t.add_column("")
    t.add_column("SFT start", justify="right")
    for r in runs:
        t.add_column(r["label"], justify="right")

    def row(name, base_cell, cell):
        t.add_row(name, base_cell, *[cell(r) for r in runs])

    row("training time", f"{res['sft']['seconds']:.0f} s", lambda r: f"{r['train_seconds']:.0f} s")
    row("accuracy, full replies", "-", lambda r: f"{r['eval']['rewards/accuracies']:.2f}")
    row("margin, full replies", "-", lambda r: f"{r['eval']['rewards/margins']:.3f}")
    curve = runs[0]["curve"]
    for i, k in enumerate(curve["k"]):
        if curve["pairs"][i] and k <= 16:
            row(f"accuracy, first {k} token{'s' if k > 1 else ''}", "-",
                lambda r, i=i: f"{r['curve']['accuracy'][i]:.2f}")
    row("first-token entropy", f"{base['entropy_first']:.3f}", lambda r: f"{r['entropy_first']:.3f}")
    if "generation" in base:
        for kind, name in (("helpful", "opens helpfully"), ("refusal", "opens with a refusal"),
                           ("other", "other openings")):
            row(name, _pct(base["generation"][kind]), lambda r, kind=kind: _pct(r["generation"][kind]))
        row("judge score (mean)", f"{base['generation']['judge_mean']:.3f}",
            lambda r: f"{r['generation']['judge_mean']:.3f}")
        row("win rate vs SFT start", "-", lambda r: "{rate:.2f} [{low:.2f}, {high:.2f}]".format(
            **r["generation"]["win_rate"]))
    return t


def reading(res: dict) -> list[str]:
    """What the numbers say, written from them (so the text cannot claim what the run did not show)."""
    runs, spec = res["runs"], res["spec"]
    lines = []
    full = ", ".join(f"{r['label']} {r['eval']['rewards/accuracies']:.2f}" for r in runs)
    lines.append(f"Full replies: held-out implicit-reward accuracy {full}.")
    worst = {r["label"]: _worst_prefix(r["curve"]) for r in runs}
    lines.append("Prefixes: lowest accuracy over k = " + "; ".join(
        f"{label} {acc:.2f} at k={k}" for label, (k, acc) in worst.items()) + ".")
    if "generation" in res["base"]:
        refusal = ", ".join(f"{r['label']} {_pct(r['generation']['refusal'])}" for r in runs)
        lines.append(f"Generations: refusals {_pct(res['base']['generation']['refusal'])} at the SFT start; "
                     f"after training {refusal}.")
    if len(runs) == 2:
        lines.append(_verdict(runs, worst, "generation" in res["base"]))
    seconds = res["seconds"]
    train = sum(r["train_seconds"] for r in runs)
    lines.append(f"Time: {seconds:.0f} s in all (SFT {res['sft']['seconds']:.0f} s"
                 f"{' (reused)' if res['sft'].get('reused') else ''}, preference training {train:.0f} s, scoring "
                 f"and sampling {res.get('eval_seconds', 0):.0f} s). Task '{spec['task']}', seed {spec['seed']}.")
    return lines


def _worst_prefix(curve: dict) -> tuple:
    points = [(k, a) for k, a, n in zip(curve["k"], curve["accuracy"], curve["pairs"]) if n and a is not None]
    return min(points, key=lambda p: p[1]) if points else ("-", float("nan"))


def _verdict(runs, worst, judged: bool) -> str:
    """One sentence comparing the two runs, chosen by what was measured (no claim the numbers do not carry)."""
    dpo, poet = runs
    d, p = dpo["label"], poet["label"]
    prefix_gain = worst[p][1] - worst[d][1]
    better_prefix = prefix_gain > 1 / 64  # more than one pair of the 64 held out
    if not judged:
        return (f"{p} prefers the chosen prefix {'more' if better_prefix else 'no more'} consistently than {d} "
                f"(lowest prefix accuracy {prefix_gain:+.2f}); generations were not sampled.")
    g_d, g_p = dpo["generation"], poet["generation"]
    w_d, w_p = g_d["win_rate"], g_p["win_rate"]
    overlap = w_p["low"] <= w_d["high"] and w_d["low"] <= w_p["high"]
    sure = ("the 95% intervals overlap, so this run alone does not settle it" if overlap
            else "the intervals do not overlap")
    fewer_refusals = g_p["refusal"] < g_d["refusal"]
    more_stray = g_p["other"] - g_d["other"] > 0.1
    if better_prefix and fewer_refusals and w_p["rate"] > w_d["rate"] and not more_stray:
        return (f"The reward-generation gap shows here: both rank full replies, but {d} prefers the chosen prefix "
                f"less often and its generations improve less (win rate {w_d['rate']:.2f} vs {w_p['rate']:.2f}; "
                f"{sure}).")
    if fewer_refusals and more_stray:
        return (f"{p} pushed the refusal down further ({_pct(g_p['refusal'])} vs {_pct(g_d['refusal'])}), but more "
                f"of its replies open with neither opener ({_pct(g_p['other'])} vs {_pct(g_d['other'])}; see "
                f"samples.jsonl): win rate {w_p['rate']:.2f} vs {w_d['rate']:.2f} ({sure}).")
    return (f"In this run POET did not show its point: lowest prefix accuracy {prefix_gain:+.2f}, refusals "
            f"{_pct(g_p['refusal'])} vs {_pct(g_d['refusal'])}, win rate {w_p['rate']:.2f} vs {w_d['rate']:.2f} "
            f"for {p} vs {d} ({sure}).")

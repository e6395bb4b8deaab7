"""Settings: example YAML files, defaults < YAML < flags, one flag and one YAML key per field, validation.

Nothing here loads a model; every test runs in milliseconds.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from poet_mlx.cli.args import build_config, resume_config
from poet_mlx.cli.train import build_parser
from poet_mlx.config import GROUPS, DataConfig, LoRAConfig, LossConfig, RunConfig, key_owners, load_yaml, validate
from poet_mlx.errors import PoetError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_YAMLS = sorted(EXAMPLES.glob("*.yaml"))
BASE = {"model": "some/model", "data": "pairs.jsonl"}


def write(tmp_path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def flat(**overrides) -> dict:
    return {**BASE, **overrides}


# ---------------------------------------------------------------------------------------------- examples


def test_the_expected_examples_exist():
    names = {p.name for p in EXAMPLE_YAMLS}
    assert {"dpo_poet.yaml", "simpo_poet.yaml", "dpo.yaml", "tiny_local.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLE_YAMLS, ids=lambda p: p.name)
def test_every_example_yaml_parses_and_validates(path):
    loaded = load_yaml(path)
    assert loaded, f"{path.name} is empty"
    assert set(loaded) <= set(key_owners()), f"{path.name} has keys that are not settings"
    cfg = RunConfig.from_flat(loaded, source=str(path))
    validate(cfg, need_data=True)
    assert cfg.model.model and cfg.data.data
    # Every value is written out on purpose: nothing relies on a float that YAML read as a string.
    assert cfg.to_flat() == {**RunConfig().to_flat(), **loaded}


def test_example_values_are_the_documented_ones():
    dpo_poet = RunConfig.from_flat(load_yaml(EXAMPLES / "dpo_poet.yaml"))
    assert dpo_poet.model.model == "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    assert dpo_poet.data.data == "HuggingFaceH4/ultrafeedback_binarized"
    assert (dpo_poet.loss.loss, dpo_poet.loss.resolved_beta, dpo_poet.loss.poet) == ("dpo", 0.1, True)
    assert dpo_poet.lora.rank == 16 and dpo_poet.lora.num_layers in (16, -1)
    assert 5e-6 <= dpo_poet.train.learning_rate <= 5e-5
    assert (dpo_poet.data.max_length, dpo_poet.data.max_prompt_length) == (1024, 512)
    assert (dpo_poet.train.batch_size, dpo_poet.train.grad_accumulation_steps) == (2, 8)

    simpo = RunConfig.from_flat(load_yaml(EXAMPLES / "simpo_poet.yaml"))
    assert (simpo.loss.loss, simpo.loss.resolved_beta, simpo.loss.gamma_beta_ratio) == ("simpo", 2.0, 0.5)
    assert simpo.loss.poet and simpo.model.ref_model is None

    tiny = RunConfig.from_flat(load_yaml(EXAMPLES / "tiny_local.yaml"))
    assert tiny.model.model == "poet-demo/model" and tiny.data.data == "poet-demo/data"
    assert tiny.lora.num_layers == -1


def test_plain_dpo_example_differs_from_dpo_poet_only_in_poet():
    """The baseline is a controlled comparison: same model, data, optimizer; only POET (and the folder)."""
    poet, plain = load_yaml(EXAMPLES / "dpo_poet.yaml"), load_yaml(EXAMPLES / "dpo.yaml")
    assert poet.pop("poet") is True and plain.pop("poet") is False
    assert poet.pop("adapter_path") != plain.pop("adapter_path")
    poet.pop("poet_ratio", None)
    assert poet == plain


@pytest.mark.parametrize("name, fmt", [("sample.jsonl", "standard"),
                                       ("sample_conversational.jsonl", "conversational")])
def test_example_data_files_load(name, fmt):
    from poet_mlx.data.sources import load_split

    rows, report = load_split(DataConfig(data=str(EXAMPLES / "data" / name)), "train")
    assert len(rows) == 6 and report.rows_skipped == 0
    assert report.format == fmt
    for row in rows:
        assert row.chosen != row.rejected
        if fmt == "conversational":
            assert [m["role"] for m in row.prompt] == ["user"]
            assert [m["role"] for m in row.chosen] == ["assistant"] == [m["role"] for m in row.rejected]


# ---------------------------------------------------------------------------------------------- flags


def parser_options() -> dict[str, list[str]]:
    """dest -> option strings of every optional argument of `poet-mlx train`."""
    return {a.dest: a.option_strings for a in build_parser()._actions if a.option_strings}


def test_every_field_has_a_dashed_flag_and_a_yaml_key_of_the_same_name(tmp_path):
    options = parser_options()
    names = [f.name for klass in GROUPS.values() for f in fields(klass)]
    assert len(names) == len(set(names)), "flat keys must be unique across groups"
    assert set(names) == set(RunConfig().to_flat())
    for name in names:
        flag = "--" + name.replace("_", "-")
        assert name in options, f"no flag for field {name}"
        assert flag in options[name], f"field {name}: flag {options[name]}, expected {flag}"
    # ... and each name is accepted as a YAML key (value: the field's own default when it has one).
    defaults = RunConfig().to_flat()
    for name in names:
        value = defaults[name] if defaults[name] not in (None, "") else None
        if value is None:
            continue
        cfg = RunConfig.from_flat(load_yaml(write(tmp_path, yaml.safe_dump({name: value}))))
        assert cfg.to_flat()[name] == value


def test_bool_fields_have_a_no_flag():
    options = parser_options()
    assert "--no-poet" in options["poet"] and "--no-chat-template" in options["chat_template"]


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "model: m/from-yaml\ndata: d.jsonl\nbeta: 0.3\nrank: 32\npoet: true\n"
                           "learning_rate: 2.0e-5\n")
    args = build_parser().parse_args(["-c", str(path), "--beta", "0.2", "--no-poet", "--model", "m/from-flag",
                                      "--iters", "7", "--keys", "self_attn.q_proj", "self_attn.v_proj"])
    cfg = build_config(args)
    assert cfg.loss.beta == 0.2 and cfg.loss.poet is False and cfg.model.model == "m/from-flag"  # flags
    assert cfg.lora.rank == 32 and cfg.train.learning_rate == 2e-5 and cfg.data.data == "d.jsonl"  # YAML
    assert cfg.train.iters == 7 and cfg.lora.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert cfg.lora.scale == 20.0 and cfg.train.batch_size == 4  # defaults


def test_flags_alone_and_no_yaml():
    cfg = build_config(build_parser().parse_args(["--model", "m/x", "--data", "d.jsonl", "--loss", "simpo"]))
    assert cfg.loss.loss == "simpo" and cfg.loss.resolved_beta == 2.0


def test_missing_model_or_data_is_reported_with_the_flag():
    with pytest.raises(PoetError, match="'model' is required: pass --model"):
        build_config(build_parser().parse_args(["--data", "d.jsonl"]))
    with pytest.raises(PoetError, match="'data' is required: pass --data"):
        build_config(build_parser().parse_args(["--model", "m/x"]))
    build_config(build_parser().parse_args(["--model", "m/x"]), need_data=False)


# ---------------------------------------------------------------------------------------------- YAML errors


def test_unknown_key_gives_a_did_you_mean_hint(tmp_path):
    path = write(tmp_path, "model: m/x\nlearning_rat: 1.0e-5\n")
    with pytest.raises(PoetError, match=r"unknown key 'learning_rat'; did you mean 'learning_rate'\?") as err:
        RunConfig.from_flat(load_yaml(path), source=str(path))
    assert str(path) in str(err.value)
    with pytest.raises(PoetError, match="did you mean 'rank'"):
        RunConfig.from_flat(load_yaml(write(tmp_path, "lora:\n  rnak: 8\n")))


def test_unknown_choice_gives_a_hint():
    with pytest.raises(PoetError, match=r"'loss' must be one of .*simpo.*did you mean 'simpo'"):
        RunConfig.from_flat(flat(loss="simp"))


@pytest.mark.parametrize("text, key", [
    ('beta: "0.1"', "beta"),              # a string for a float
    ("learning_rate: fast", "learning_rate"),
    ("model: null", "model"),             # null for a required setting
    ("rank: null", "rank"),
    ("rank: true", "rank"),               # a bool for an int
    ("batch_size: 2.5", "batch_size"),    # a float for an int
    ("poet: 1", "poet"),                  # an int for a bool
    ("keys: q_proj", "keys"),             # a string for a list
])
def test_wrong_types_are_rejected_naming_the_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text + "\n")
    with pytest.raises(PoetError, match=f"'{key}' must") as err:
        RunConfig.from_flat(load_yaml(path), source=str(path))
    assert str(path) in str(err.value)


def test_ints_pass_as_floats_and_optional_keys_take_null():
    cfg = RunConfig.from_flat(flat(beta=1, learning_rate=1, iters=None, ref_model=None))
    assert isinstance(cfg.loss.beta, float) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.iters is None


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    cfg = RunConfig.from_flat(load_yaml(write(tmp_path, "learning_rate: 5e-6\nbeta: 1e-1\n")))
    assert cfg.train.learning_rate == 5e-6 and cfg.loss.beta == 0.1


def test_bad_yaml_and_non_mapping_and_missing_file(tmp_path):
    with pytest.raises(PoetError, match=r"cfg.yaml line 2: not valid YAML"):
        load_yaml(write(tmp_path, "beta: 0.1\n  rank: 8\n"))
    with pytest.raises(PoetError, match="expected a mapping"):
        load_yaml(write(tmp_path, "- beta\n- rank\n"))
    with pytest.raises(PoetError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    assert load_yaml(write(tmp_path, "# only a comment\n")) == {}


def test_grouped_yaml_form_is_accepted(tmp_path):
    path = write(tmp_path, "model:\n  model: m/x\n  ref_model: m/ref\ndata: d.jsonl\n"
                           "lora:\n  rank: 8\n  num_layers: -1\nloss:\n  loss: dpo\n  beta: 0.05\n"
                           "train:\n  learning_rate: 3.0e-5\n")
    cfg = RunConfig.from_flat(load_yaml(path))
    validate(cfg)
    assert (cfg.model.model, cfg.model.ref_model, cfg.data.data) == ("m/x", "m/ref", "d.jsonl")
    assert (cfg.lora.rank, cfg.lora.num_layers, cfg.loss.beta, cfg.train.learning_rate) == (8, -1, 0.05, 3e-5)
    # A group name that is also a flat key keeps its flat meaning when its value is not a mapping.
    assert RunConfig.from_flat(load_yaml(write(tmp_path, "loss: simpo\n"))).loss.loss == "simpo"


# ---------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("overrides, key", [
    ({"beta": 0.0}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"beta": float("inf")}, "beta"),
    ({"rank": 0}, "rank"),
    ({"rank": -4}, "rank"),
    ({"poet_ratio": 0.0}, "poet_ratio"),
    ({"poet_ratio": 1.5}, "poet_ratio"),
    ({"poet_ratio": -0.5}, "poet_ratio"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1e-5}, "learning_rate"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"max_length": 512, "max_prompt_length": 512}, "max_prompt_length"),
    ({"max_length": 256, "max_prompt_length": 300}, "max_prompt_length"),
    ({"max_prompt_length": 0}, "max_prompt_length"),
    ({"loss": "dpo", "sft_weight": 0.5}, "sft_weight"),
    ({"loss": "simpo", "ref_model": "m/ref"}, "ref_model"),
    ({"num_layers": 0}, "num_layers"),
    ({"num_layers": -2}, "num_layers"),
    ({"batch_size": 0}, "batch_size"),
    ({"grad_accumulation_steps": 0}, "grad_accumulation_steps"),
    ({"iters": 0}, "iters"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"dropout": 1.0}, "dropout"),
    ({"resume": True, "overwrite": True}, "resume"),
])
def test_out_of_range_values_are_rejected_naming_the_key(overrides, key):
    cfg = RunConfig.from_flat(flat(**overrides))
    with pytest.raises(PoetError, match=f"^'{key}' "):
        validate(cfg)


@pytest.mark.parametrize("overrides", [
    {"poet_ratio": 1.0}, {"poet_ratio": 0.25}, {"label_smoothing": 0.49}, {"num_layers": -1},
    {"loss": "simpo", "sft_weight": 0.5}, {"loss": "dpo", "ref_model": "m/ref"}, {"beta": 1e-4},
    {"max_length": 2, "max_prompt_length": 1},
])
def test_boundary_values_that_are_allowed(overrides):
    validate(RunConfig.from_flat(flat(**overrides)))


# ---------------------------------------------------------------------------------------------- defaults


def test_loss_defaults():
    assert LossConfig().loss == "dpo" and LossConfig().beta is None
    assert LossConfig().resolved_beta == 0.1
    for loss in ("ipo", "hinge", "robust"):
        assert LossConfig(loss=loss).resolved_beta == 0.1
    assert LossConfig(loss="simpo").resolved_beta == 2.0
    assert LossConfig(loss="simpo", beta=10.0).resolved_beta == 10.0
    assert LossConfig().gamma_beta_ratio == 0.5
    assert (LossConfig().poet, LossConfig().poet_ratio, LossConfig().label_smoothing) == (False, 1.0, 0.0)
    assert LossConfig(loss="simpo").needs_reference is False and LossConfig().needs_reference is True


def test_lora_defaults_are_mlx_lms():
    lora = LoRAConfig()
    # mlx-lm's rank, scale, dropout and type; num_layers differs on purpose: unset means all layers (mlx-lm's
    # 16 fails outright on a model with fewer layers).
    assert (lora.fine_tune_type, lora.rank, lora.scale, lora.dropout, lora.num_layers) == ("lora", 8, 20.0, 0.0, None)
    # Read mlx-lm's own defaults from its source without importing it (importing mlx_lm.lora changes the
    # global yaml.SafeLoader).
    source = Path(importlib.util.find_spec("mlx_lm").submodule_search_locations[0]) / "lora.py"
    tree = ast.parse(source.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "CONFIG_DEFAULTS" for t in n.targets))
    theirs = ast.literal_eval(node.value)
    assert theirs["num_layers"] == 16
    assert theirs["lora_parameters"] == {"rank": lora.rank, "dropout": lora.dropout, "scale": lora.scale}
    assert theirs["fine_tune_type"] == lora.fine_tune_type


def test_other_defaults_validate_once_model_and_data_are_given():
    cfg = RunConfig()
    assert cfg.data.max_length == 1024 and cfg.data.max_prompt_length is None
    assert cfg.data.resolved_max_prompt_length == 512
    assert cfg.train.adapter_path == "adapters" and cfg.train.iters is None and cfg.train.learning_rate == 1e-5
    validate(RunConfig.from_flat(BASE))


# ---------------------------------------------------------------------------------------------- resume


def saved_run(**overrides) -> dict:
    return RunConfig.from_flat(flat(adapter_path="runs/a", iters=100, rank=16, **overrides)).to_flat()


def test_resume_accepts_iters_and_reporting_changes():
    cfg = resume_config(saved_run(), {"resume": True, "iters": 250, "steps_per_eval": 50, "adapter_path": "runs/a"})
    assert cfg.train.iters == 250 and cfg.train.steps_per_eval == 50
    assert cfg.train.resume is True and cfg.train.overwrite is False
    assert cfg.lora.rank == 16 and cfg.model.model == "some/model"  # the run's own settings


def test_resume_accepts_repeating_the_runs_own_settings():
    cfg = resume_config(saved_run(), {"resume": True, "rank": 16, "model": "some/model", "iters": 100})
    assert cfg.lora.rank == 16


@pytest.mark.parametrize("given, key", [
    ({"rank": 8}, "rank"), ({"beta": 0.2}, "beta"), ({"poet": True}, "poet"),
    ({"model": "other/model"}, "model"), ({"learning_rate": 1e-4}, "learning_rate"),
])
def test_resume_rejects_conflicting_settings(given, key):
    with pytest.raises(PoetError, match=f"--resume continues a run.*{key}: the run has"):
        resume_config(saved_run(), {"resume": True, **given})


def test_resume_rejects_bad_values_and_unknown_keys():
    with pytest.raises(PoetError, match="'iters' must be > 0"):
        resume_config(saved_run(), {"resume": True, "iters": 0})
    with pytest.raises(PoetError, match="unknown key"):
        resume_config(saved_run(), {"resume": True, "itres": 5})


def test_resume_accepts_another_spelling_of_the_run_folder():
    cfg = resume_config(saved_run(), {"resume": True, "adapter_path": "./runs/a", "iters": 200})
    assert cfg.train.iters == 200


def test_unset_lengths_and_layers_never_trip_a_user(tiny_model_dir, tiny_data_dir, tmp_path):
    """--max-length 256 alone works (the prompt limit follows it); an unset --num-layers adapts every layer of
    a model with fewer than mlx-lm's 16 and says so; explicit values that cannot work stay errors."""
    from poet_mlx.errors import PoetError
    from poet_mlx.reporting import RecordingReporter
    from poet_mlx.train.run import run_training

    cfg = RunConfig.from_flat({"model": str(tiny_model_dir), "data": str(tiny_data_dir), "max_length": 256,
                               "adapter_path": str(tmp_path / "run"), "iters": 1, "batch_size": 2,
                               "steps_per_eval": 0, "save_every": 0})
    validate(cfg)
    assert cfg.data.resolved_max_prompt_length == 128
    rec = RecordingReporter()
    summary = run_training(cfg, rec)
    header = summary["header"]
    assert header["num_layers"] == 2
    assert header["notes"] == ["adapting all 2 layers (--num-layers not set)",
                               "max_prompt_length 128 = min(512, max_length // 2) (--max-prompt-length not set)"]
    bad = RunConfig.from_flat({"model": "m", "data": "d", "max_length": 256, "max_prompt_length": 256})
    with pytest.raises(PoetError, match="max_prompt_length"):
        validate(bad)
    too_many = RunConfig.from_flat({"model": str(tiny_model_dir), "data": str(tiny_data_dir), "num_layers": 16,
                                    "adapter_path": str(tmp_path / "run2"), "iters": 1})
    with pytest.raises(PoetError, match="num_layers is 16 but the model has only 2 layers"):
        run_training(too_many)

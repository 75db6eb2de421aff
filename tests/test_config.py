"""Tests of rlhf_jax.cli.config: strict YAML loading, overrides, validation errors, dump/hash,
and that every YAML in configs/ loads and validates."""
import dataclasses
import glob
import os

import pytest
import yaml

from rlhf_jax.cli.config import (
    COMMAND_CONFIGS,
    ConfigError,
    EvalConfig,
    PPORunConfig,
    RewardRunConfig,
    SFTRunConfig,
    apply_overrides,
    config_hash,
    dump_config,
    field_help,
    from_dict,
    load_config,
)
from rlhf_jax.train import PPOConfig, SFTConfig
from rlhf_jax.train.rl.presets import ALGORITHMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def config_class(path):
    """The command of a config file is the first word of its name (sft, reward, ppo, eval, export)."""
    command = os.path.basename(path).split(".")[0].split("_")[0]
    if command not in COMMAND_CONFIGS and command in ALGORITHMS:  # grpo_*.yaml, ...: `rlhf-jax rl` recipes
        command = "rl"
    return COMMAND_CONFIGS[command]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


MINIMAL_SFT = "model:\n  path: m\ndata:\n  train_files: [a.jsonl]\n"


def test_every_shipped_config_loads_and_validates():
    assert len(ALL_CONFIGS) >= 8, ALL_CONFIGS
    commands = set()
    for path in ALL_CONFIGS:
        cls = config_class(path)
        cfg = load_config(path, [], cls)
        commands.add(cls)
        # The resolved config round-trips through YAML.
        assert from_dict(cls, yaml.safe_load(dump_config(cfg))) == cfg, path
    assert commands == set(COMMAND_CONFIGS.values())


@pytest.mark.parametrize("path", [p for p in ALL_CONFIGS if "tiny" not in p])
def test_real_recipes_validate_with_tiny_stand_ins(path, tmp_path):
    """The real-run recipes also validate with every model/data path pointed at local stand-ins."""
    cls = config_class(path)
    cfg = load_config(path, [], cls)
    out_key = "run.output_dir" if hasattr(cfg, "run") else "output_dir"
    overrides = [f"{out_key}={tmp_path}/out"]
    if hasattr(cfg, "model"):
        overrides.append(f"model.path={tmp_path}/model")
    if hasattr(cfg, "data") and cfg.data.train_files:
        overrides.append(f"data.train_files=[{tmp_path}/train.jsonl]")
    local = load_config(path, overrides, cls)
    assert (local.run.output_dir if hasattr(cfg, "run") else local.output_dir) == f"{tmp_path}/out"
    assert "expected cost" in open(path).read().lower(), f"{path} must state its expected cost"


def test_unknown_key_names_dotted_key_file_and_line(tmp_path):
    path = write(tmp_path, MINIMAL_SFT + "train:\n  batch_size: 8\n  learnin_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [], SFTRunConfig)
    message = str(e.value)
    assert f"{path}, line 7" in message and "unknown key `train.learnin_rate`" in message
    assert "learning_rate" in message  # the suggestion


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, MINIMAL_SFT + "optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"line 5: unknown key `optimiser`"):
        load_config(path, [], SFTRunConfig)


@pytest.mark.parametrize("extra, message", [
    ("train:\n  batch_size: 8.5\n", r"line 6: `train.batch_size`: expected int, got float 8.5"),
    ("train:\n  batch_size: true\n", r"line 6: `train.batch_size`: expected int, got bool True"),
    ("tokenizer:\n  pad_token: 3\n", r"line 6: `tokenizer.pad_token`: expected str \| null, got int 3"),
    ("train:\n  optimizer:\n    learning_rate: fast\n",
     r"line 7: `train.optimizer.learning_rate`: expected float, got str 'fast'"),
    ("run:\n  mesh: 4\n", r"line 6: `run.mesh`: expected a mapping, got int 4"),
    ("run:\n  keep: [1]\n", r"line 6: `run.keep`: expected int, got list \[1\]"),
    ("train:\n  optimizer:\n    schedule: cosin\n",
     r"line 7: `train.optimizer.schedule`: expected one of \['constant', 'cosine', 'linear'\], got 'cosin'"),
    ("train:\n  batch_size: -8\n", r"line 6: `train.batch_size` must be an int >= 1, got -8"),
    ("train:\n  batch_size: 0\n", r"line 6: `train.batch_size` must be an int >= 1, got 0"),
    ("train:\n  num_epochs: 0\n", r"line 6: `train.num_epochs` must be an int >= 1, got 0"),
    ("train:\n  optimizer:\n    learning_rate: -1\n", r"line 7: `train.optimizer.learning_rate` must be > 0"),
    ("train:\n  optimizer:\n    b2: 1.5\n", r"line 7: `train.optimizer.b2` must lie in \[0, 1\)"),
    ("train:\n  loss_agg: mean\n", r"line 6: `train.loss_agg`: expected one of \['token-mean'"),
])
def test_wrong_types_name_key_expected_and_got(tmp_path, extra, message):
    path = write(tmp_path, MINIMAL_SFT + extra)
    with pytest.raises(ConfigError, match=r"c\.yaml, " + message):
        load_config(path, [], SFTRunConfig)


@pytest.mark.parametrize("data, message", [
    ("  too_long: cut\n", r"`data.too_long`: expected one of \['error', 'truncate', 'drop'\], got 'cut'"),
    ("  buckets: [16, x]\n", r"`data.buckets\[1\]`: expected int, got str 'x'"),
    ("  eval_files: {a: 1}\n", r"`data.eval_files`: expected a list, got dict"),
])
def test_wrong_types_in_lists_and_sections(tmp_path, data, message):
    path = write(tmp_path, "model:\n  dtype: float32\n  path: m\ndata:\n  train_files: [a.jsonl]\n" + data)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [], SFTRunConfig)
    path = write(tmp_path, "model:\n  path: m\n  dtype: float64\n")
    with pytest.raises(ConfigError, match=r"line 3: `model.dtype`: expected one of \['float32', 'bfloat16', "
                                          r"'float16'\], got 'float64'"):
        load_config(path, [], SFTRunConfig)


def test_yaml_floats_without_a_dot_are_accepted(tmp_path):
    # PyYAML reads `1e-4` as a string; a float field takes it anyway.
    path = write(tmp_path, MINIMAL_SFT + "train:\n  optimizer:\n    learning_rate: 1e-4\n")
    assert load_config(path, [], SFTRunConfig).train.optimizer.learning_rate == 1e-4


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=10", "train.grad_accum_steps=4"],
     r"`train.batch_size` \(10\) must be divisible by `train.grad_accum_steps` \(4\)"),
    (["train.batch_size=12", "run.mesh.data=8"],
     r"`train.batch_size` \(12\) must be divisible by `run.mesh.data` \(8\)"),
    (["data.max_length=8", "data.max_prompt_length=16"], r"`data.max_length` \(8\) must exceed"),
    (["data.buckets=[8]"], r"`data.buckets`: the largest bucket \(8\) is shorter than `data.max_length` \(512\)"),
    (["model.random_init={model_type: gpt2}"], r"give exactly one of `model.path` and `model.random_init`"),
    (["run.checkpoint_every=0"], r"`run.checkpoint_every` must be an int >= 1 or null"),
    (["train.optimizer.schedule=cosine", "train.optimizer.total_steps=5", "train.optimizer.warmup_steps=5"],
     r"`train.optimizer.total_steps` \(5\) must be larger than `train.optimizer.warmup_steps` \(5\)"),
    (["train.learning_rate=1"], r"unknown key `train.learning_rate` \(did you mean train.optimizer.learning_rate\?\)"),
])
def test_impossible_settings_name_the_keys(overrides, message):
    base = ["model.path=m", "data.train_files=[a.jsonl]"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, base + overrides, SFTRunConfig)


def test_ppo_batch_arithmetic_and_reward_source():
    base = ["model.path=m", "data.train_files=[p.jsonl]", "reward.function=rlhf_jax.rewards.verifiers:math_reward"]
    with pytest.raises(ConfigError, match=r"`train.batch.batch_size` \(64\) must be divisible by "
                                          r"`train.batch.num_minibatches` \* `train.batch.grad_accum_steps` "
                                          r"\(4 \* 32 = 128\)"):
        load_config(None, base + ["train.batch.grad_accum_steps=32"], PPORunConfig)
    with pytest.raises(ConfigError, match=r"give exactly one of `reward.model_path` and `reward.function`"):
        load_config(None, base[:2], PPORunConfig)
    with pytest.raises(ConfigError, match=r"`reward.function` must be `module:function`"):
        load_config(None, base[:2] + ["reward.function=verifiers.math"], PPORunConfig)
    with pytest.raises(ConfigError, match=r"`value_model`: `reward_model` needs `reward.model_path`"):
        load_config(None, base + ["value_model=reward_model"], PPORunConfig)
    with pytest.raises(ConfigError, match=r"`train.value_optimizer`: the value head shares"):
        load_config(None, base + ["train.value_optimizer={learning_rate: 1.0e-5}"], PPORunConfig)
    for bad, message in (("train.kl.kl_estimator=k4", r"`train.kl.kl_estimator`: expected one of"),
                         ("train.loss.loss_agg=mean", r"`train.loss.loss_agg`: expected one of"),
                         ("train.advantages.lam=2", r"`train.advantages.lam` must lie in \[0, 1\]"),
                         ("train.sampling.temperature=0", r"`train.sampling.temperature` must be > 0"),
                         ("num_iterations=0", r"`num_iterations` must be >= 1"),
                         ("train.value_optimizer={learnig_rate: 1}",
                          r"unknown key `train.value_optimizer.learnig_rate`")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + [bad, "value_model=v"], PPORunConfig)
    cfg = load_config(None, base + ["train.batch.batch_size=32", "train.batch.num_minibatches=8"], PPORunConfig)
    assert isinstance(cfg.train, PPOConfig) and cfg.train.batch.batch_size == 32


def test_override_values_are_yaml_scalars():
    cfg = load_config(None, ["model.path=m", "data.train_files=[a.jsonl, b.parquet]",
                             "train.optimizer.max_grad_norm=null", "train.optimizer.learning_rate=3e-5",
                             "data.max_rows=10", "model.random_init=null", "train.optimizer.mu_dtype=bfloat16"],
                      SFTRunConfig)
    assert cfg.data.train_files == ("a.jsonl", "b.parquet")
    assert cfg.train.optimizer.max_grad_norm is None and cfg.train.optimizer.mu_dtype == "bfloat16"
    assert cfg.train.optimizer.learning_rate == 3e-5 and cfg.data.max_rows == 10
    # A single string for a list of files is a one-item list.
    one = load_config(None, ["model.path=m", "data.train_files=x.jsonl"], SFTRunConfig)
    assert one.data.train_files == ("x.jsonl",)


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, MINIMAL_SFT)
    with pytest.raises(ConfigError, match=r"with override 'train.batch_size=big': `train.batch_size`: expected int"):
        load_config(path, ["train.batch_size=big"], SFTRunConfig)
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        load_config(path, ["train.batch_size"], SFTRunConfig)
    with pytest.raises(ConfigError, match=r"`model.path.x` .*`model.path` is not a section|is not a section"):
        apply_overrides({"model": {"path": "m"}}, ["model.path.x=1"])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"), [], SFTRunConfig)
    path = write(tmp_path, "model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml, line \d+: invalid YAML"):
        load_config(path, [], SFTRunConfig)
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"the top level must be a mapping"):
        load_config(path, [], SFTRunConfig)


def test_dump_round_trip_and_hash(tmp_path):
    cfg = load_config(None, ["model.path=m", "data.train_files=[a.jsonl]", "train.batch_size=4"], SFTRunConfig)
    path = write(tmp_path, dump_config(cfg))
    again = load_config(path, [], SFTRunConfig)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    elsewhere = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir="elsewhere"))
    assert config_hash(elsewhere) == config_hash(cfg)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, optimizer=dataclasses.replace(cfg.train.optimizer, learning_rate=2e-4)))
    assert config_hash(changed) != config_hash(cfg)
    assert isinstance(cfg.train, SFTConfig)


def test_field_help_documents_every_leaf():
    for cls in COMMAND_CONFIGS.values():
        rows = field_help(cls)
        keys = [k for k, _, _ in rows]
        assert len(keys) == len(set(keys))
        # Every field, ours and the trainers', carries its help in its metadata.
        undocumented = [k for k, _, text in rows if text.startswith("[default")]
        assert not undocumented, undocumented
    ppo = {k: text for k, _, text in field_help(PPORunConfig)}
    assert {"train.kl.kl_coef", "train.batch.num_minibatches", "reward.function", "run.mesh.fsdp",
            "train.value_optimizer", "train.optimizer.mu_dtype"} <= set(ppo)
    # a section's defaults are the ones its parent creates
    assert ppo["train.optimizer.learning_rate"].endswith("[default: 1e-05]")
    assert ppo["run.output_dir"].endswith("[default: 'runs/ppo']")


def test_eval_config_checks():
    base = ["data.train_files=[p.jsonl]"]
    with pytest.raises(ConfigError, match=r"`models`: list at least one"):
        load_config(None, base, EvalConfig)
    with pytest.raises(ConfigError, match=r"`models`: names must be distinct"):
        load_config(None, base + ["models=[{name: a, path: x}, {name: a, path: y}]"], EvalConfig)
    with pytest.raises(ConfigError, match=r"`ks` must lie in 1..num_samples \(4\)"):
        load_config(None, base + ["models=[{name: a, path: x}]", "num_samples=4", "ks=[1, 8]"], EvalConfig)
    with pytest.raises(ConfigError, match=r"unknown key `models\[0\].pth`|unknown key `models\[0\]\.pth`"):
        load_config(None, base + ["models=[{name: a, pth: x}]"], EvalConfig)


@pytest.mark.parametrize("path", [p for p in ALL_CONFIGS if "tiny" not in p and
                                  os.path.basename(p).split("_")[0] in ("sft", "reward", "ppo", "eval")])
def test_real_recipes_read_local_rows_in_their_columns(path, tmp_path):
    """Each recipe's data section (columns, template, lengths) tokenizes a local stand-in file."""
    import json

    from rlhf_jax.cli.commands import _load_examples
    from rlhf_jax.data.tokenizers import char_tokenizer

    command = os.path.basename(path).split("_")[0]
    cfg = load_config(path, [], config_class(path))
    d = cfg.data
    row = {d.prompt_column: "what is two plus two?", d.completion_column: "it is 4",
           d.chosen_column: "four", d.rejected_column: "five", d.answer_column: "#### 4"}
    local = tmp_path / "rows.jsonl"
    local.write_text(json.dumps(row) + "\n")
    eval_files = f"[{local}]" if d.eval_files else "[]"
    cfg = load_config(path, [f"data.train_files=[{local}]", f"data.eval_files={eval_files}"], config_class(path))
    kind = {"sft": "sft", "reward": "preference"}.get(command, "prompt")
    train, held_out = _load_examples(cfg.data, char_tokenizer(), kind=kind)
    assert len(train) == 1 and (held_out is None) == (not d.eval_files)
    if d.prompt_template:
        assert train.prompts[0] == d.prompt_template.replace("{prompt}", row[d.prompt_column])
    if kind == "prompt":
        assert train.answers == ("#### 4",)


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path, MINIMAL_SFT + "train:\n  batch_size: 8\n  seed: 1\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"line 8: duplicate key `train.batch_size` \(first set on line 6\)"):
        load_config(path, [], SFTRunConfig)


def test_rl_algorithm_presets_and_errors(tmp_path):
    from rlhf_jax.cli.config import RLRunConfig

    base = "model:\n  path: m\nreward:\n  function: a:b\ndata:\n  train_files: [a.jsonl]\n"
    cfg = load_config(write(tmp_path, base + "algorithm: dapo\n"), [], RLRunConfig)
    assert cfg.train.loss.clip_eps_high == 0.28 and cfg.train.rewards.dynamic_sampling
    assert cfg.train.kl.placement == "none" and cfg.train.advantages.estimator == "grpo"
    cfg = load_config(write(tmp_path, base + "algorithm: gspo\ntrain:\n  batch:\n    group_size: 2\n"), [],
                      RLRunConfig)
    assert cfg.train.loss.ratio == "sequence" and cfg.train.batch.group_size == 2
    assert cfg.train.batch.ppo_epochs == 1  # the preset's, kept next to the user's key
    with pytest.raises(ConfigError, match="`algorithm`"):
        load_config(write(tmp_path, base + "algorithm: a2c\n"), [], RLRunConfig)
    with pytest.raises(ConfigError, match="train.loss.clip"):
        load_config(write(tmp_path, base), ["train.loss.clip=0.1"], RLRunConfig)
    with pytest.raises(ConfigError, match="`value_model`.*no critic"):
        load_config(write(tmp_path, base), ["value_model=some/folder"], RLRunConfig)
    with pytest.raises(ConfigError, match="group_size"):
        load_config(write(tmp_path, base), ["train.batch.group_size=1"], RLRunConfig)


def test_a_partial_section_keeps_the_commands_own_defaults():
    """`run: {seed: 1}` keeps the command's run folder and checkpoint period; a PPO optimizer
    section keeps PPO's learning rate; the library's RunOptions runs on one device."""
    from rlhf_jax.train import RunOptions

    base = ["model.path=m", "data.train_files=[p.jsonl]", "reward.function=rlhf_jax.rewards.verifiers:math_reward"]
    cfg = load_config(None, base + ["run.seed=1", "train.optimizer.schedule=cosine"], PPORunConfig)
    assert (cfg.run.output_dir, cfg.run.checkpoint_every, cfg.run.seed) == ("runs/ppo", 20, 1)
    assert cfg.run.mesh.data == -1  # the CLI uses every device by default
    assert cfg.train.optimizer.learning_rate == 1e-5 and cfg.train.optimizer.schedule == "cosine"
    assert load_config(None, base[:2] + ["train.optimizer.warmup_steps=2"], RewardRunConfig).train.optimizer \
        .learning_rate == 5e-5
    assert RunOptions().mesh.single_device


def test_model_remat_choices_are_the_model_policies_and_reach_the_lm(tmp_path):
    import typing

    from rlhf_jax.cli.commands import load_model
    from rlhf_jax.cli.config import ModelSection
    from rlhf_jax.models.stack import REMAT_POLICIES

    assert set(typing.get_args(typing.get_type_hints(ModelSection)["remat"])) == set(REMAT_POLICIES)
    path = write(tmp_path, MINIMAL_SFT)
    assert load_config(path, [], SFTRunConfig).model.remat == "none"
    assert load_config(path, ["model.remat=full"], SFTRunConfig).model.remat == "full"
    with pytest.raises(ConfigError, match="remat"):
        load_config(path, ["model.remat=sometimes"], SFTRunConfig)
    tiny = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16}
    lm, _ = load_model(ModelSection(random_init=tiny, remat="save_dots_no_batch"), head="lm")
    assert lm.remat == "save_dots_no_batch"

"""Run configurations: frozen dataclasses, loaded from YAML with dotted overrides.

Every `rlhf-jax` subcommand reads one config class from this module. The
training commands compose the trainers' own hyper-parameter dataclasses
(`SFTConfig`, `RewardConfig`, `DPOConfig`, `PPOConfig` from `rlhf_jax.train`, each with a
nested `OptimizerConfig`) with the sections a run needs around them: the
model, the tokenizer, the data, the reward, and `run` (`RunOptions`: output
folder, seed, checkpoints, logging, mesh), the same object the drivers take.

`load_config(path, overrides, cls)` (from `rlhf_jax.cli.yaml_config`,
re-exported) turns a YAML file plus `a.b=c` overrides into an instance of
`cls` and validates all of it before anything touches a model: an unknown key,
a value of the wrong type or out of range, or batch sizes that cannot be split
as asked raise `ConfigError`, whose message names the dotted key and the file
(and line, where the YAML has one). `dump_config` writes the resolved config
back as YAML, and `config_hash` fingerprints it. Every field's `--help` text
is its `metadata["help"]` (`rlhf_jax.train.options.hyper`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rlhf_jax.cli.yaml_config import (  # noqa: F401  (re-exported)
    ConfigError,
    apply_overrides,
    config_hash,
    dump_config,
    field_help,
    from_dict,
    load_config,
    to_dict,
)
from rlhf_jax.train.dpo import DPOConfig
from rlhf_jax.train.options import RESUMABLE_RUN_OPTIONS, MeshOptions, RunOptions, hyper
from rlhf_jax.train.options import check as _require
from rlhf_jax.train.reward import RewardConfig
from rlhf_jax.train.rl.config import RLConfig
from rlhf_jax.train.rl.ppo import PPOConfig
from rlhf_jax.train.rl.presets import ALGORITHMS, preset_train_section
from rlhf_jax.train.sft import SFTConfig

__all__ = [
    "ConfigError",
    "ModelSection",
    "TokenizerSection",
    "DataSection",
    "RewardSection",
    "LoRASection",
    "RunOptions",
    "SFTRunConfig",
    "RewardRunConfig",
    "DPORunConfig",
    "PPORunConfig",
    "RLRunConfig",
    "EvalModel",
    "EvalConfig",
    "ExportConfig",
    "COMMAND_CONFIGS",
    "RESUMABLE_KEYS",
    "apply_overrides",
    "load_config",
    "from_dict",
    "to_dict",
    "dump_config",
    "config_hash",
    "field_help",
]

def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """`hyper` with the help text first (the sections below read better that way)."""
    return hyper(default, text, factory=factory)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """Which model to start from."""

    path: str | None = _help("local HF folder (config.json + safetensors), GGUF file (or a folder holding "
                             "one) or hub id of the starting model", None)
    random_init: dict | None = _help(
        "instead of `path`: an HF-style config.json dict (with `model_type`) for a randomly initialised "
        "model (tests, experiments)", None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("compute dtype", "float32")
    param_dtype: Literal["float32", "bfloat16", "float16"] = _help("parameter (master weight) dtype", "float32")
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "storage dtype of the frozen networks' weights (RL reference and reward model; with `lora:`, the frozen "
        "base)", "bfloat16")
    remat: Literal["none", "full", "save_dots", "save_dots_no_batch", "save_attention"] = _help(
        "activation checkpointing per layer in the training steps", "none")


@dataclass(frozen=True)
class TokenizerSection:
    """The tokenizer (an HF `AutoTokenizer` folder)."""

    path: str | None = _help("tokenizer folder, GGUF file or hub id; default: model.path", None)
    pad_token: str | None = hyper(
        None, "a token already in the vocabulary to use as PAD when the tokenizer has none or its PAD equals EOS")
    chat_template: str | None = hyper(
        None, "a Jinja chat template (or the path of a .jinja file) replacing the tokenizer's own; message-list "
              "rows need one")


@dataclass(frozen=True)
class DataSection:
    """Training / evaluation data and how it is tokenized."""

    train_files: tuple[str, ...] = _help(
        "JSONL or Parquet files, or HF data sets `name[:config]:split` (needs `datasets` and network)", ())
    eval_files: tuple[str, ...] = _help("held-out files in the same format (optional)", ())
    prompt_column: str = _help("column with the prompt (string or message list)", "prompt")
    completion_column: str = _help("SFT: column with the completion", "completion")
    messages_column: str = _help("SFT: column with a conversation (list of {role, content})", "messages")
    chosen_column: str = _help("preferences: column with the preferred response", "chosen")
    rejected_column: str = _help("preferences: column with the dispreferred response", "rejected")
    answer_column: str = _help("RL: column with the reference answer for verifiers (optional)", "answer")
    max_prompt_length: int = _help("longest prompt in tokens; a longer prompt is an error naming its line", 256)
    max_length: int = _help("longest prompt + completion in tokens", 512)
    too_long: Literal["error", "truncate", "drop"] = _help(
        "rows over the limits: error; truncate the completion to max_length (a too-long prompt stays an "
        "error); or drop the row (too-long prompts too)", "error")
    prompt_template: str | None = _help(
        "for string prompts: a text with `{prompt}` where the prompt goes, e.g. 'Question: {prompt}\\nAnswer:'",
        None)
    buckets: tuple[int, ...] = _help("allowed padded lengths (the data is padded to the smallest that fits)",
                                      (16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
    max_rows: int | None = _help("use only the first N rows of each file (quick experiments)", None)


@dataclass(frozen=True)
class RewardSection:
    """Where PPO's reward comes from: a reward model or a Python function."""

    model_path: str | None = _help(
        "folder of a reward model (ours, from `rlhf-jax reward`, or an HF *ForSequenceClassification)", None)
    function: str | None = _help(
        "`module:function` or `path/to/file.py:function` reward, called as f(prompts, completions, answer=[...]) "
        "-> list of floats (e.g. rlhf_jax.rewards.verifiers:math_reward). RUNS USER CODE: the module is imported "
        "(a .py file executed) with your permissions; name only code you trust", None)


@dataclass(frozen=True)
class LoRASection:
    """LoRA: train low-rank adapters (and the new heads) on a frozen base (rlhf_jax.models.lora)."""

    rank: int = _help("adapter rank r (>= 1)", 8)
    alpha: float = _help("scale numerator: the low-rank term is multiplied by alpha / r (> 0)", 16.0)
    targets: str | None = _help(
        "regular expression matched in full against projection names (e.g. 'q_proj|v_proj'); null: every "
        "projection of the family (Llama's q/k/v/o/gate/up/down, GPT-2's c_attn/c_proj/c_fc)", None)
    use_rslora: bool = _help("rank-stabilised scale alpha / sqrt(r) (arXiv 2312.03732)", False)

    def to_lora_config(self):
        """The `rlhf_jax.models.LoRAConfig` of this section."""
        from rlhf_jax.models.lora import LoRAConfig

        kwargs = {} if self.targets is None else {"targets": self.targets}
        return LoRAConfig(rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora, **kwargs)


def _check_lora(lora: LoRASection | None):
    if lora is None:
        return
    try:
        lora.to_lora_config()
    except ValueError as e:
        raise ConfigError(f"`lora`: {e}") from None


_LORA_HELP = ("LoRA adapters on a frozen base (null: full fine-tuning); the base is stored in model.frozen_dtype "
              "and, in RL and DPO, is also the reference")


# --------------------------------------------------------------------------- run configs


def _check_model(model: ModelSection, tokenizer: TokenizerSection, prefix: str = "model"):
    _require((model.path is None) != (model.random_init is None),
             f"`{prefix}.path`: give exactly one of `{prefix}.path` and `{prefix}.random_init`")
    if model.random_init is not None:
        _require("model_type" in model.random_init,
                 f"`{prefix}.random_init`: the config dict needs a `model_type` (e.g. gpt2, llama)")
        _require(tokenizer.path is not None,
                 "`tokenizer.path`: a randomly initialised model needs an explicit tokenizer path")


def _check_data(data: DataSection, *, prompts_only: bool = False):
    _require(len(data.train_files) > 0, "`data.train_files`: give at least one JSONL/Parquet file")
    _require(data.max_prompt_length >= 1, f"`data.max_prompt_length` must be >= 1, got {data.max_prompt_length}")
    _require(len(data.buckets) > 0 and min(data.buckets) >= 1, "`data.buckets` must be positive lengths")
    # Prompt sets (PPO, eval) only use max_prompt_length; sequences also need max_length.
    longest, name = (data.max_prompt_length, "max_prompt_length") if prompts_only else (data.max_length, "max_length")
    if not prompts_only:
        _require(data.max_length > data.max_prompt_length,
                 f"`data.max_length` ({data.max_length}) must exceed `data.max_prompt_length` "
                 f"({data.max_prompt_length})")
    _require(max(data.buckets) >= longest,
             f"`data.buckets`: the largest bucket ({max(data.buckets)}) is shorter than `data.{name}` ({longest})")
    _require(data.max_rows is None or data.max_rows >= 1, "`data.max_rows` must be >= 1 or null")
    _require(data.prompt_template is None or "{prompt}" in data.prompt_template,
             "`data.prompt_template` must contain `{prompt}` where the prompt goes")


_ALL_DEVICES = MeshOptions(data=-1, fsdp=1)


def _check_common(cfg, batch_size: int):
    if hasattr(cfg.train, "num_epochs"):
        _require(cfg.train.num_epochs is not None, "`train.num_epochs` must be >= 1, got null")
    mesh = cfg.run.mesh
    if mesh.data > 0:
        _require(batch_size % mesh.data == 0,
                 f"`train.batch_size` ({batch_size}) must be divisible by `run.mesh.data` ({mesh.data})")


def _run_field(output_dir: str, *, checkpoint_every: int):
    """The `run:` section of a training command, with that command's default folder."""
    return hyper(help="run folder, seed, checkpoints, logging, mesh (rlhf_jax.train.RunOptions)",
                 factory=lambda: RunOptions(output_dir=output_dir, checkpoint_every=checkpoint_every,
                                            mesh=_ALL_DEVICES))


def _check_training(cfg, batch_size: int, *, prompts_only: bool = False):
    """The checks every training command shares: model, data, batch over the mesh, LoRA."""
    _check_model(cfg.model, cfg.tokenizer)
    _check_data(cfg.data, prompts_only=prompts_only)
    _check_common(cfg, batch_size)
    _check_lora(cfg.lora)


def _check_online(cfg):
    """The checks `ppo` and `rl` share: the reference under LoRA and exactly one reward source."""
    _check_training(cfg, cfg.train.batch.batch_size, prompts_only=True)
    _require(cfg.lora is None or cfg.reference is None,
             "`reference`: with `lora:` the reference is the frozen base; set reference to null")
    _require((cfg.reward.model_path is None) != (cfg.reward.function is None),
             "`reward.model_path`: give exactly one of `reward.model_path` and `reward.function`")
    if cfg.reward.function is not None:
        _require(":" in cfg.reward.function,
                 f"`reward.function` must be `module:function`, got {cfg.reward.function!r}")


@dataclass(frozen=True)
class SFTRunConfig:
    """`rlhf-jax sft`: supervised fine-tuning on prompt/completion or messages rows."""

    model: ModelSection = hyper(help="starting model", factory=ModelSection)
    tokenizer: TokenizerSection = hyper(help="tokenizer", factory=TokenizerSection)
    data: DataSection = hyper(help="data", factory=DataSection)
    train: SFTConfig = hyper(help="SFT hyper-parameters (rlhf_jax.train.SFTConfig)", factory=SFTConfig)
    lora: LoRASection | None = hyper(None, _LORA_HELP)
    run: RunOptions = _run_field("runs/sft", checkpoint_every=500)

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_training(self, self.train.batch_size)


@dataclass(frozen=True)
class RewardRunConfig:
    """`rlhf-jax reward`: a Bradley-Terry reward model on prompt/chosen/rejected rows."""

    model: ModelSection = hyper(help="starting model (usually the SFT policy's hf/ folder)", factory=ModelSection)
    tokenizer: TokenizerSection = hyper(help="tokenizer", factory=TokenizerSection)
    data: DataSection = hyper(help="data", factory=DataSection)
    train: RewardConfig = hyper(help="reward-model hyper-parameters (rlhf_jax.train.RewardConfig)",
                                factory=RewardConfig)
    lora: LoRASection | None = hyper(None, _LORA_HELP)
    normalize: bool = hyper(True, "after training, shift the head so scores on the training prompts' chosen "
                                  "and rejected responses have mean 0")
    run: RunOptions = _run_field("runs/reward", checkpoint_every=500)

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_training(self, self.train.batch_size)


@dataclass(frozen=True)
class DPORunConfig:
    """`rlhf-jax dpo`: DPO (or IPO, hinge, SimPO) on prompt/chosen/rejected rows against a frozen reference."""

    model: ModelSection = hyper(help="starting policy (usually the SFT run's hf/ folder)", factory=ModelSection)
    reference: str | None = hyper(None, "frozen reference model folder (null: the starting model; unused by simpo)")
    tokenizer: TokenizerSection = hyper(help="tokenizer", factory=TokenizerSection)
    data: DataSection = hyper(help="preference pairs (`prompt`, `chosen`, `rejected`)", factory=DataSection)
    train: DPOConfig = hyper(help="DPO hyper-parameters (rlhf_jax.train.DPOConfig)", factory=DPOConfig)
    lora: LoRASection | None = hyper(None, _LORA_HELP)
    run: RunOptions = _run_field("runs/dpo", checkpoint_every=500)

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_training(self, self.train.batch_size)
        _require(self.reference is None or bool(self.reference), "`reference` must be a model folder or null")
        _require(self.lora is None or self.reference is None,
                 "`reference`: with `lora:` the reference is the frozen base; set reference to null")


@dataclass(frozen=True)
class PPORunConfig:
    """`rlhf-jax ppo`: PPO against a reward model or a reward function, with a frozen reference."""

    model: ModelSection = hyper(help="the policy's starting point (usually the SFT run's hf/ folder)",
                                factory=ModelSection)
    reference: str | None = hyper(None, "frozen reference model folder (null: a copy of the starting policy)")
    value_model: str | None = hyper(
        None, "null: a value head on the policy trunk; `reward_model`: a separate value network initialised "
              "from reward.model_path (N+ recipe); or a model folder")
    tokenizer: TokenizerSection = hyper(help="tokenizer", factory=TokenizerSection)
    data: DataSection = hyper(help="prompts (`prompt`, optional `answer`)", factory=DataSection)
    reward: RewardSection = hyper(help="reward source", factory=RewardSection)
    train: PPOConfig = hyper(help="PPO hyper-parameters (rlhf_jax.train.PPOConfig)", factory=PPOConfig)
    lora: LoRASection | None = hyper(None, _LORA_HELP)
    num_iterations: int = hyper(100, "PPO iterations (each: sample, score, update; a resumed run may extend it)")
    run: RunOptions = _run_field("runs/ppo", checkpoint_every=20)

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_online(self)
        if self.value_model == "reward_model":
            _require(self.reward.model_path is not None,
                     "`value_model`: `reward_model` needs `reward.model_path`")
        elif self.value_model is None:
            _require(self.train.value_optimizer is None,
                     "`train.value_optimizer`: the value head shares the policy's trunk and optimizer "
                     "(value_model is null); set value_model or remove train.value_optimizer")
        _require(isinstance(self.num_iterations, int) and self.num_iterations >= 1,
                 f"`num_iterations` must be >= 1, got {self.num_iterations}")


Algorithm = Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "dapo", "gspo"]


@dataclass(frozen=True)
class RLRunConfig:
    """`rlhf-jax rl`: the RL trainer (an `algorithm:` preset of `train:`, then your keys over it)."""

    algorithm: Algorithm = hyper(
        "grpo", "preset of the train section: ppo | grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | "
                "dapo | gspo (rlhf_jax.train.rl.presets); keys given under train override it")
    model: ModelSection = hyper(help="the policy's starting point (usually the SFT run's hf/ folder)",
                                factory=ModelSection)
    reference: str | None = hyper(None, "frozen reference model folder (null: a copy of the starting policy)")
    value_model: str | None = hyper(
        None, "the critic (advantages.estimator gae only): null = a value head on the policy trunk; "
              "`reward_model`: a separate value network from reward.model_path; or a model folder")
    tokenizer: TokenizerSection = hyper(help="tokenizer", factory=TokenizerSection)
    data: DataSection = hyper(help="prompts (`prompt`, optional `answer`)", factory=DataSection)
    reward: RewardSection = hyper(help="reward source", factory=RewardSection)
    train: RLConfig = hyper(help="RL hyper-parameters (rlhf_jax.train.rl.RLConfig)", factory=RLConfig)
    lora: LoRASection | None = hyper(None, _LORA_HELP)
    num_iterations: int = hyper(100, "iterations (each: sample, score, update; a resumed run may extend it)")
    run: RunOptions = _run_field("runs/rl", checkpoint_every=20)

    @classmethod
    def preprocess(cls, data: dict) -> dict:
        """The YAML mapping with the `algorithm`'s preset laid under its `train:` keys."""
        data = dict(data)
        algorithm = data.get("algorithm", "grpo")
        _require(algorithm in ALGORITHMS, f"`algorithm` must be one of {list(ALGORITHMS)}, got {algorithm!r}")
        train = data.get("train") or {}
        _require(isinstance(train, dict), f"`train` must be a mapping, got {train!r}")
        data["train"] = preset_train_section(algorithm, train)
        return data

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_online(self)
        critic = self.train.advantages.needs_critic
        _require(critic or self.value_model is None,
                 f"`value_model`: train.advantages.estimator {self.train.advantages.estimator!r} has no critic; "
                 "set value_model to null")
        if self.value_model == "reward_model":
            _require(self.reward.model_path is not None, "`value_model`: `reward_model` needs `reward.model_path`")
        _require(self.value_model is not None or self.train.value_optimizer is None,
                 "`train.value_optimizer`: there is no separate value network (value_model is null)")
        _require(isinstance(self.num_iterations, int) and self.num_iterations >= 1,
                 f"`num_iterations` must be >= 1, got {self.num_iterations}")


@dataclass(frozen=True)
class EvalModel:
    """One model to evaluate."""

    name: str = _help("label in the table and the plot", "model")
    path: str = _help("HF folder, or a run folder of `rlhf-jax sft|ppo` (its hf/ export, else its newest "
                      "checkpoint)", "")


@dataclass(frozen=True)
class EvalConfig:
    """`rlhf-jax eval`: pass@k of one or more models on a prompt set with a verifier."""

    models: tuple[EvalModel, ...] = _help("models to compare: list of {name, path}", ())
    tokenizer: TokenizerSection = _help("tokenizer (default: the first model's folder)", factory=TokenizerSection)
    data: DataSection = _help("prompt set (`prompt` + `answer` columns)", factory=DataSection)
    verifier: str = _help("`module:function` or `path/to/file.py:function` scoring completions, as in "
                          "reward.function; a score > 0.5 counts as correct. RUNS USER CODE: the module is imported "
                          "(a .py file executed) with your permissions; name only code you trust",
                          "rlhf_jax.rewards.verifiers:math_reward")
    num_samples: int = _help("n, samples per prompt (pass@k for k = 1..n)", 16)
    max_new_tokens: int = _help("response length limit", 64)
    temperature: float = _help("sampling temperature", 1.0)
    ks: tuple[int, ...] = _help("the k to report (empty: powers of two up to n, and n)", ())
    batch_size: int = _help("prompts per sampling batch", 16)
    reward_model: str | None = _help("optional reward-model folder (or reward run folder): also report its mean "
                                     "score", None)
    reference: str | None = _help("optional reference-model folder (or run folder): also report "
                                  "KL(model || reference)", None)
    bootstrap: int = _help("bootstrap resamples for the pass@k confidence intervals", 1000)
    seed: int = _help("sampling seed", 0)
    output_dir: str = _help("folder for eval.json and pass_at_k.png", "runs/eval")

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _require(len(self.models) > 0, "`models`: list at least one {name, path}")
        for i, m in enumerate(self.models):
            _require(bool(m.path), f"`models[{i}].path` is empty")
        names = [m.name for m in self.models]
        _require(len(set(names)) == len(names), f"`models`: names must be distinct, got {names}")
        _require(":" in self.verifier, f"`verifier` must be `module:function`, got {self.verifier!r}")
        _check_data(self.data, prompts_only=True)
        _require(self.num_samples >= 1, f"`num_samples` must be >= 1, got {self.num_samples}")
        _require(self.max_new_tokens >= 1, f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        _require(self.batch_size >= 1, f"`batch_size` must be >= 1, got {self.batch_size}")
        _require(self.temperature > 0, f"`temperature` must be > 0 for pass@k sampling, got {self.temperature}")
        _require(all(1 <= k <= self.num_samples for k in self.ks),
                 f"`ks` must lie in 1..num_samples ({self.num_samples}), got {list(self.ks)}")
        _require(self.bootstrap >= 0, f"`bootstrap` must be >= 0, got {self.bootstrap}")


@dataclass(frozen=True)
class ExportConfig:
    """`rlhf-jax export`: write a run's newest checkpoint as an HF folder."""

    run_dir: str = _help("the run folder of `rlhf-jax sft|reward|dpo|ppo` (holds resolved_config.yaml)", "")
    output_dir: str = _help("where to write config.json, model.safetensors and the tokenizer", "runs/export")
    dtype: Literal["float32", "bfloat16", "float16"] = _help("dtype of the written weights", "float32")

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _require(bool(self.run_dir), "`run_dir`: name the run folder to export")


COMMAND_CONFIGS = {
    "sft": SFTRunConfig,
    "reward": RewardRunConfig,
    "dpo": DPORunConfig,
    "ppo": PPORunConfig,
    "rl": RLRunConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
}
"""The config class of each subcommand that takes `--config`."""

RESUMABLE_KEYS = ("train.num_epochs", "num_iterations") + tuple(f"run.{name}" for name in RESUMABLE_RUN_OPTIONS)
"""Dotted keys a resumed run may change: its length and how it logs and checkpoints, not its math.
(A decaying schedule whose length follows the run length is written out as
`train.optimizer.total_steps`, so extending such a run shows up as a change of that key.)"""

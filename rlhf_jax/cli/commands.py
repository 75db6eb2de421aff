"""The stages behind `rlhf-jax`: validate -> claim the run folder -> models -> driver -> HF export.

Each command runs in two phases:

1. `prepare(command, cfg)` validates everything that can be known without
   building a model, before any folder is touched (so `--dry_run` runs all of
   it): the tokenizer (and its chat template), every data file and its
   columns (the answer column when a verifier reads it), the batch size
   against the number of rows, model folders and their `config.json`, the
   vocabulary size, that a reward model has a trained score head, the reward
   function. It also resolves what the tokenizer and the data decide (PAD/EOS
   ids, the schedule length), so the config that is printed, hashed and
   written as `resolved_config.yaml` is the one the trainer uses. It returns a
   `Plan`.
2. `execute(plan, overwrite=...)` claims the run folder
   (`rlhf_jax.cli.run_folder.claim_run_folder`: lock, resume or refuse,
   `--overwrite` moves the old run aside until the first checkpoint), builds
   the models, calls the driver of `rlhf_jax.train.drivers` (which logs,
   checkpoints, resumes and handles SIGINT/SIGTERM) and writes the final model
   in HF format to `run.output_dir/hf/`.

`run_<command>(cfg, *, overwrite)` does both. `run_export` re-exports a run.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

import numpy as np

from rlhf_jax.cli.config import ConfigError
from rlhf_jax.cli.run_folder import (  # noqa: F401  (re-exported)
    CONFIG_FILE,
    RUN_FILE,
    RunError,
    claim_run_folder,
    read_run,
)
from rlhf_jax.data.datasets import (
    DataError,
    preference_examples,
    prompt_examples,
    read_sources,
    sft_examples,
    special_token_ids,
)
from rlhf_jax.errors import LoadError

__all__ = [
    "RunError",
    "CONFIG_FILE",
    "RUN_FILE",
    "Plan",
    "prepare",
    "execute",
    "claim_run_folder",
    "read_run",
    "load_tokenizer",
    "load_model",
    "run_sft",
    "run_reward",
    "run_dpo",
    "run_ppo",
    "run_rl",
    "run_eval",
    "run_export",
    "load_run_model",
    "with_lora",
    "merged_lora",
]


# --------------------------------------------------------------------------- building blocks


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def _check_exists(path: str, what: str):
    """A local-looking path that does not exist is an error (instead of a hub lookup)."""
    if os.path.exists(path):
        return
    first = path.split("/")[0]
    if path.count("/") != 1 or path.startswith((".", "/", "~")) or os.path.exists(first):
        raise RunError(f"{what} {path} does not exist")


def load_tokenizer(tokenizer_cfg, model_cfg=None, *, fallback: str | None = None):
    """`AutoTokenizer` from `tokenizer.path`, else the model's path (or `fallback`); a GGUF path
    gives the tokenizer (and chat template) stored in the file."""
    path = tokenizer_cfg.path or (model_cfg.path if model_cfg is not None else None) or fallback
    if path is None:
        raise ConfigError("`tokenizer.path`: no tokenizer given and no model path to take it from")
    from transformers import AutoTokenizer

    from rlhf_jax.models.hf.gguf import is_gguf, load_gguf_tokenizer

    _check_exists(path, "tokenizer folder")
    try:
        tok = load_gguf_tokenizer(path) if is_gguf(path) else AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, JSONDecodeError, ...
        raise LoadError(f"cannot load a tokenizer from {path} (tokenizer.path / model.path): "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if tokenizer_cfg.pad_token is not None:
        special_token_ids(tok, pad_token=tokenizer_cfg.pad_token)  # checks it exists and differs from EOS
        tok.pad_token = tokenizer_cfg.pad_token
    template = getattr(tokenizer_cfg, "chat_template", None)
    if template is not None:
        if template.endswith((".jinja", ".j2", ".txt")) or os.path.isfile(template):
            try:
                with open(template, encoding="utf-8") as f:
                    template = f.read()
            except OSError as e:
                raise ConfigError(f"`tokenizer.chat_template`: cannot read {template} ({e.strerror})") from None
        if "{" not in template:
            raise ConfigError("`tokenizer.chat_template` is neither a Jinja template nor a readable file")
        tok.chat_template = template
    return tok


def load_model(model_cfg, *, head: str, seed: int = 0, param_dtype=None, mesh=None, fsdp=None):
    """`(lm, params)` from `model.path` (HF folder) or `model.random_init` (a config.json dict).

    The compute dtype and remat policy are `model.dtype` / `model.remat`; the weights are stored
    in `param_dtype` (default `model.param_dtype`: the master weights of a trained network;
    pass `model.frozen_dtype` for a frozen one). With `mesh`, a checkpoint is read straight into
    its shards (`param_shardings` of the mesh; FSDP when `fsdp`, default when the mesh's fsdp
    axis is > 1).
    """
    from rlhf_jax.models import ModelConfig, from_config

    kwargs = {"dtype": _dtype(model_cfg.dtype),
              "param_dtype": _dtype(param_dtype or model_cfg.param_dtype),
              "remat": getattr(model_cfg, "remat", "none")}
    if model_cfg.random_init is not None:
        try:
            config = ModelConfig.from_hf_config(dict(model_cfg.random_init))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"`model.random_init`: not a usable model config ({e})") from None
        return from_config(config, head=head, seed=seed, **kwargs)
    return load_pretrained(model_cfg.path, head=head, seed=seed, mesh=mesh, fsdp=fsdp, **kwargs)


def load_pretrained(path: str, *, head: str, seed: int = 0, dtype=None, param_dtype=None, remat="none",
                    mesh=None, fsdp=None):
    """`from_pretrained` of a local folder, `(lm, params)` (a missing folder is a RunError naming it).

    With `mesh`, every device reads only its own slices of the safetensors (see `from_pretrained`).
    """
    import jax.numpy as jnp

    from rlhf_jax.models import from_pretrained

    _check_exists(path, "model folder")
    shardings = None
    if mesh is not None:
        from rlhf_jax.train.sharding import FSDP_AXIS, param_shardings

        fsdp = mesh.shape[FSDP_AXIS] > 1 if fsdp is None else fsdp
        shardings = lambda abstract: param_shardings(abstract, mesh, fsdp=fsdp)  # noqa: E731
    return from_pretrained(path, head=head, seed=seed, dtype=dtype or jnp.float32,
                           param_dtype=param_dtype or jnp.float32, remat=remat, shardings=shardings)


def export_model(lm, params, tokenizer, out_dir: str, *, save_dtype=None) -> str:
    """Write `lm` with `params` as an HF folder (+ tokenizer, + the score bias of a reward model)."""
    import warnings

    os.makedirs(out_dir, exist_ok=True)
    if lm.head == "lm+value":
        lm, params = lm.with_head("lm", params)
    special = {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "eos_token_id", "bos_token_id")}
    special = {k: int(v) for k, v in special.items() if v is not None and getattr(lm.config, k, v) != v}
    if special:
        # The written config.json must name the tokenizer's PAD/EOS: HF's sequence classifier
        # reads the score at the last token that is not pad_token_id, and generate stops at EOS.
        lm = dataclasses.replace(lm, config=dataclasses.replace(lm.config, **special))
    from rlhf_jax.models import save_pretrained

    with warnings.catch_warnings():
        # The value head and the score bias are handled here; the exporter's warnings do not apply.
        warnings.filterwarnings("ignore", message=".*(value head|reward head bias).*")
        save_pretrained(lm, params, out_dir, tokenizer=tokenizer, save_dtype=save_dtype)
    return out_dir


def _lora_param_dtype(cfg):
    """The dtype to load the starting weights in: `model.frozen_dtype` under `lora:` (they become
    the frozen base), else None (`model.param_dtype`, the master weights)."""
    return cfg.model.frozen_dtype if getattr(cfg, "lora", None) is not None else None


def with_lora(cfg, lm, params, *, seed: int = 0):
    """`(lm, trained, frozen)`: without `cfg.lora`, `(lm, params, None)`; with it, `lm` with the
    adapters attached, the trained part (fresh adapters and the new heads, in
    `model.param_dtype`) and the frozen base (`params` as loaded, in `model.frozen_dtype`)."""
    lora = getattr(cfg, "lora", None)
    if lora is None:
        return lm, params, None
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models.lora import add_lora, combine, partition, trained_heads

    try:
        lora_lm, adapters = add_lora(lm, lora.to_lora_config(), seed=seed)
    except ValueError as e:  # the targets match no projection of this family
        raise ConfigError(f"`lora.targets`: {e}") from None
    trained, frozen = partition(combine(params, adapters), heads=trained_heads(lora_lm))
    master = _dtype(cfg.model.param_dtype)
    trained = jax.tree.map(lambda x: x.astype(master) if jnp.issubdtype(x.dtype, jnp.floating) else x, trained)
    return lora_lm, trained, frozen


def merged_lora(cfg, lm, trained, frozen):
    """`(lm, params)` to export: unchanged without LoRA, else the adapters folded into the base
    (`merge_adapters`) and the weights in `model.param_dtype`."""
    if frozen is None:
        return lm, trained
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models.lora import combine, merge_adapters

    master = _dtype(cfg.model.param_dtype)
    full = jax.tree.map(lambda x: x.astype(master) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        combine(frozen, trained))
    base_lm, merged = merge_adapters(lm, full)  # W + scale A B, summed in float32
    return dataclasses.replace(base_lm, param_dtype=master), merged


def _export_lora_adapter(cfg, lm, trained, out_dir: str):
    """Also write the adapters of a LoRA policy as a PEFT folder (`run.output_dir/peft`)."""
    if getattr(cfg, "lora", None) is None or lm.head not in ("lm", "lm+value"):
        return
    from rlhf_jax.models.hf.peft import save_peft_adapter
    from rlhf_jax.models.lora import split_adapters

    adapters, _ = split_adapters(trained)
    save_peft_adapter(lm, adapters, out_dir, base_model_name_or_path=cfg.model.path)


def _data_kwargs(data, *, kind: str, pad_token=None) -> dict:
    common = {"prompt_column": data.prompt_column, "max_prompt_length": data.max_prompt_length,
              "buckets": data.buckets, "pad_token": pad_token,
              "prompt_template": data.prompt_template, "too_long": data.too_long}
    if kind == "sft":
        return {**common, "completion_column": data.completion_column, "messages_column": data.messages_column,
                "max_length": data.max_length, "too_long": data.too_long}
    if kind == "preference":
        return {**common, "chosen_column": data.chosen_column, "rejected_column": data.rejected_column,
                "max_length": data.max_length, "too_long": data.too_long}
    return {**common, "answer_column": data.answer_column}


def _load_examples(data, tokenizer, *, kind: str, pad_token=None):
    build = {"sft": sft_examples, "preference": preference_examples, "prompt": prompt_examples}[kind]
    kwargs = _data_kwargs(data, kind=kind, pad_token=pad_token)
    train = build(read_sources(data.train_files, max_rows=data.max_rows), tokenizer, **kwargs)
    held_out = None
    if data.eval_files:
        held_out = build(read_sources(data.eval_files, max_rows=data.max_rows), tokenizer, **kwargs)
    return train, held_out


def _report(message: str):
    print(f"[rlhf-jax] {message}", flush=True)




# --------------------------------------------------------------------------- validation (no models)


def _read_hf_config(folder: str, key: str) -> dict | None:
    """The `config.json` of a model folder, with its weight files checked for completeness
    (headers only); errors name the file and the config key."""
    from rlhf_jax.models.hf.gguf import is_gguf
    from rlhf_jax.models.hf.pretrained import check_checkpoint

    if is_gguf(folder):
        return None  # a GGUF file (or a folder holding one) carries its config inside; read when loaded
    if not os.path.isdir(folder):
        raise RunError(f"`{key}`: {folder} is not a folder")
    try:
        return check_checkpoint(folder)
    except FileNotFoundError as e:
        raise LoadError(f"`{key}`: {e}") from None


def _model_hf_config(model_cfg, key: str = "model") -> dict | None:
    """The HF config dict of `model.path` or `model.random_init` (None for a hub id)."""
    if model_cfg.random_init is not None:
        return dict(model_cfg.random_init)
    _check_exists(model_cfg.path, "model folder")
    if not os.path.isdir(model_cfg.path):
        return None  # a hub id: checked when it is downloaded
    return _read_hf_config(model_cfg.path, f"{key}.path")


def _check_vocab_size(tok, hf_config: dict | None, key: str):
    if not hf_config or not isinstance(hf_config.get("vocab_size"), int):
        return
    n_tok, n_emb = len(tok), hf_config["vocab_size"]
    if n_tok > n_emb:
        raise ConfigError(f"`{key}`: the tokenizer has {n_tok} tokens but the model's embedding has only {n_emb} "
                          "rows (config.json vocab_size); use the matching tokenizer")


def _check_reward_model(path: str, key: str):
    """A reward model must have a trained score head: our export or an HF *ForSequenceClassification."""
    _check_exists(path, "reward model folder")
    if not os.path.isdir(path):
        return  # a hub id
    config = _read_hf_config(path, key)
    if config is None:
        raise ConfigError(f"`{key}`: {path} is a GGUF file, which holds no trained score head; give the hf/ folder "
                          "of an `rlhf-jax reward` run or an HF *ForSequenceClassification checkpoint")
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"`{key}`: {path} holds a {archs[0] if archs else 'model without architectures'}, not a "
                          "reward model: it has no trained score head (give the hf/ folder of an `rlhf-jax reward` "
                          "run or an HF *ForSequenceClassification checkpoint)")
    if config.get("num_labels", 1) != 1:
        raise ConfigError(f"`{key}`: {path} is a classifier with num_labels={config.get('num_labels')}; a reward "
                          "model has one")


def _check_lora_targets(cfg, hf_config: dict | None):
    """`lora.targets` match a projection of the model (checked on its config, without weights)."""
    lora = getattr(cfg, "lora", None)
    if lora is None or not hf_config:
        return
    from rlhf_jax.models import LM, ModelConfig

    try:
        config = ModelConfig.from_hf_config(hf_config)
    except (KeyError, TypeError, ValueError):
        return  # an unusable config.json is reported where the model is built
    try:
        LM(config, "lm", lora=lora.to_lora_config()).abstract_params()
    except ValueError as e:
        raise ConfigError(f"`lora.targets`: {e}") from None


def _check_batch(batch_size: int, examples, what: str, data_cfg, key: str = "train.batch_size"):
    if batch_size > len(examples):
        raise ConfigError(f"`{key}` ({batch_size}) is larger than the {len(examples)} {what} of "
                          f"{', '.join(data_cfg.train_files)}: no full batch can be formed")


def _load_function(spec: str, key: str):
    from rlhf_jax.rewards.functions import load_function

    try:
        return load_function(spec)
    except ValueError as e:
        raise ConfigError(f"`{key}`: {e}") from None


def _check_answers(fn, spec: str, key: str, examples, data_cfg):
    """A function that reads `answer` needs the answer column in every row (else it scores 0 silently)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    reads = any(p.name == "answer" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if not reads:
        return
    missing = [where for where, answer in zip(examples.rows, examples.answers) if answer is None]
    if missing:
        raise DataError(f"{missing[0]}: no `{data_cfg.answer_column}` column (`data.answer_column`), which "
                        f"`{key}` {spec} reads ({len(missing)} of {len(examples)} rows lack it)")


def _check_run_sinks(command: str, cfg):
    """The logging sinks and periods of `run:` can work: the wandb package, held-out data to evaluate."""
    import importlib.util

    run = cfg.run
    if run.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise ConfigError("`run.wandb.enabled` is true but the `wandb` package is not installed; "
                          "`pip install 'rlhf_jax[wandb]'` (or `pip install wandb`), or set run.wandb.enabled=false")
    if run.eval_every is not None and not cfg.data.eval_files:
        raise ConfigError(f"`run.eval_every` ({run.eval_every}) needs held-out data: set `data.eval_files`")
    if run.log_samples_every is not None and command == "reward":
        raise ConfigError("`run.log_samples_every`: a reward-model run samples no completions; set it to null")


def _schedule_length(opt, total_updates: int):
    if opt is None or opt.total_steps is not None or opt.schedule == "constant":
        return opt
    return dataclasses.replace(opt, total_steps=int(total_updates))


@dataclasses.dataclass
class Plan:
    """A validated command, ready to run: the resolved config and what `prepare` loaded."""

    command: str
    cfg: Any
    tokenizer: Any = None
    train: Any = None
    held_out: Any = None
    reward_fn: Any = None


def prepare(command: str, cfg) -> Plan:
    """Validate `cfg` against its tokenizer, data and model folders; resolve derived values.

    Touches no output folder and builds no model (`--dry_run` stops after it).
    """
    if command == "export":
        return Plan(command, cfg)
    if command == "eval":
        return _prepare_eval(cfg)
    _check_run_sinks(command, cfg)
    tok = load_tokenizer(cfg.tokenizer, cfg.model)
    hf_config = _model_hf_config(cfg.model)
    _check_vocab_size(tok, hf_config, "model.path" if cfg.model.path else "model.random_init")
    _check_lora_targets(cfg, hf_config)
    if command in ("ppo", "rl"):
        return _prepare_ppo(cfg, tok, command)
    kind = "sft" if command == "sft" else "preference"
    train, held_out = _load_examples(cfg.data, tok, kind=kind, pad_token=cfg.tokenizer.pad_token)
    what = "examples" if command == "sft" else "preference pairs"
    _check_batch(cfg.train.batch_size, train, what, cfg.data)
    if command == "dpo" and cfg.reference is not None:
        _check_exists(cfg.reference, "`reference`: model folder")
        if os.path.isdir(cfg.reference):
            _check_vocab_size(tok, _read_hf_config(cfg.reference, "reference"), "reference")
    updates = (len(train) // cfg.train.batch_size) * cfg.train.num_epochs
    train_cfg = dataclasses.replace(cfg.train, optimizer=_schedule_length(cfg.train.optimizer, updates))
    return Plan(command, dataclasses.replace(cfg, train=train_cfg), tok, train, held_out)


def _prepare_ppo(cfg, tok, command: str = "ppo") -> Plan:
    prompts, held_out = _load_examples(cfg.data, tok, kind="prompt", pad_token=cfg.tokenizer.pad_token)
    _check_batch(cfg.train.batch.batch_size, prompts, "prompts", cfg.data, key="train.batch.batch_size")
    for key, path in (("reference", cfg.reference),
                      ("value_model", None if cfg.value_model in (None, "reward_model") else cfg.value_model)):
        if path is not None:
            _check_exists(path, f"`{key}`: model folder")
            if os.path.isdir(path):
                _read_hf_config(path, key)
    reward_fn = None
    if cfg.reward.model_path is not None:
        _check_reward_model(cfg.reward.model_path, "reward.model_path")
    else:
        reward_fn = _load_function(cfg.reward.function, "reward.function")
        _check_answers(reward_fn, cfg.reward.function, "reward.function", prompts, cfg.data)
        if held_out is not None:
            _check_answers(reward_fn, cfg.reward.function, "reward.function", held_out, cfg.data)
    # The ids the sampler uses are the tokenizer's, written into the config before it is hashed.
    pad_id, eos_id = special_token_ids(tok, pad_token=cfg.tokenizer.pad_token)
    sampling = cfg.train.sampling
    if sampling.pad_token_id is not None and sampling.pad_token_id != pad_id:
        raise ConfigError(f"`train.sampling.pad_token_id` ({sampling.pad_token_id}) differs from the tokenizer's PAD "
                          f"({pad_id}); set `tokenizer.pad_token` instead")
    sampling = dataclasses.replace(sampling, pad_token_id=pad_id,
                                   eos_token_id=eos_id if sampling.eos_token_id is None else sampling.eos_token_id)
    b = cfg.train.batch
    updates = cfg.num_iterations * b.ppo_epochs * b.num_minibatches
    train = dataclasses.replace(cfg.train, sampling=sampling,
                                optimizer=_schedule_length(cfg.train.optimizer, updates),
                                value_optimizer=_schedule_length(cfg.train.value_optimizer, updates))
    return Plan(command, dataclasses.replace(cfg, train=train), tok, prompts, held_out, reward_fn=reward_fn)


def _prepare_eval(cfg) -> Plan:
    tok = load_tokenizer(cfg.tokenizer, fallback=_tokenizer_source(cfg.models[0].path))
    prompts, _ = _load_examples(cfg.data, tok, kind="prompt", pad_token=cfg.tokenizer.pad_token)
    verifier = _load_function(cfg.verifier, "verifier")
    _check_answers(verifier, cfg.verifier, "verifier", prompts, cfg.data)
    for i, m in enumerate(cfg.models):
        _check_exists(m.path, f"`models[{i}].path`: model folder")
    if cfg.reference is not None:
        _check_exists(cfg.reference, "`reference`: model folder")
    if cfg.reward_model is not None:
        _check_reward_model(_reward_export(cfg.reward_model), "reward_model")
    return Plan("eval", cfg, tok, prompts, reward_fn=verifier)


def _reward_export(path: str) -> str:
    """A reward run folder means its normalised hf/ export."""
    if os.path.isfile(os.path.join(path, RUN_FILE)) and os.path.isdir(os.path.join(path, "hf")):
        return os.path.join(path, "hf")
    return path


def execute(plan: Plan, *, overwrite: bool = False) -> str:
    """Run a prepared command; returns what it wrote (the hf/ folder, eval.json, the export)."""
    runner = {"sft": _execute_sft, "reward": _execute_reward, "dpo": _execute_dpo, "ppo": _execute_ppo,
              "rl": _execute_ppo, "eval": _execute_eval, "export": _execute_export}[plan.command]
    return runner(plan, overwrite=overwrite)


def _claim(plan: Plan, *, overwrite: bool):
    folder = claim_run_folder(plan.command, plan.cfg, plan.cfg.run.output_dir, overwrite=overwrite)
    if folder.resume:
        _report(f"resuming the run in {folder.path}")
    return folder


# --------------------------------------------------------------------------- the stages


def run_sft(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax sft`: returns the HF export folder (`run.output_dir/hf`)."""
    return execute(prepare("sft", cfg), overwrite=overwrite)


def run_reward(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax reward`: returns the HF export folder (a *ForSequenceClassification)."""
    return execute(prepare("reward", cfg), overwrite=overwrite)


def run_dpo(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax dpo`: returns the HF export folder of the policy (a *ForCausalLM)."""
    return execute(prepare("dpo", cfg), overwrite=overwrite)


def run_ppo(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax ppo`: returns the HF export folder of the policy (a *ForCausalLM)."""
    return execute(prepare("ppo", cfg), overwrite=overwrite)


def run_rl(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax rl`: returns the HF export folder of the policy (a *ForCausalLM)."""
    return execute(prepare("rl", cfg), overwrite=overwrite)


def run_eval(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax eval`: pass@k of every model; returns the path of eval.json."""
    return execute(prepare("eval", cfg), overwrite=overwrite)


def run_export(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax export`: the newest checkpoint of `run_dir` as an HF folder; returns the folder."""
    return execute(prepare("export", cfg), overwrite=overwrite)


def _check_model_vocab(tok, lm):
    from rlhf_jax.train.state import check_vocab

    try:
        check_vocab(tok, lm)
    except ValueError as e:
        raise ConfigError(f"`tokenizer.path`: {e}") from None


def _execute_sft(plan: Plan, *, overwrite: bool) -> str:
    from rlhf_jax.train.drivers import fit_sft, mesh_from_options

    cfg, tok, train = plan.cfg, plan.tokenizer, plan.train
    _report(f"sft: {len(train)} examples of length {train.arrays['input_ids'].shape[1]}"
            + (f" ({train.dropped} dropped as too long)" if train.dropped else ""))
    with _claim(plan, overwrite=overwrite) as folder:
        mesh = mesh_from_options(cfg.run)
        lm, params = load_model(cfg.model, head="lm", seed=cfg.run.seed, mesh=mesh,
                                param_dtype=_lora_param_dtype(cfg))
        _check_model_vocab(tok, lm)
        lm, params, frozen = with_lora(cfg, lm, params, seed=cfg.run.seed)
        sample_fn = _sft_sample_fn(cfg, tok, lm, plan.held_out or train) if cfg.run.log_samples_every else None
        params, _ = fit_sft(lm, params, train.arrays, cfg.train, cfg.run, mesh=mesh,
                            eval_data=plan.held_out.arrays if plan.held_out else None, sample_fn=sample_fn,
                            on_checkpoint=folder.commit_overwrite, frozen=frozen)
        _export_lora_adapter(cfg, lm, params, os.path.join(cfg.run.output_dir, "peft"))
        out = export_model(*merged_lora(cfg, lm, params, frozen), tok, os.path.join(cfg.run.output_dir, "hf"))
        folder.commit_overwrite()
    return out


def _decoder(tok):
    from rlhf_jax.data.tokenizers import decode_tokens

    def decode(ids, mask):
        return decode_tokens(tok, ids, mask)

    return decode


def _sft_sample_fn(cfg, tok, lm, examples):
    """Greedy completions of the first `run.num_logged_samples` prompts of `examples` (held-out first)."""
    from rlhf_jax.eval.training_eval import sft_sample_fn

    k = min(cfg.run.num_logged_samples, len(examples))
    ids, attn, loss = (np.asarray(examples.arrays[name][:k]) for name in ("input_ids", "attention_mask", "loss_mask"))
    prompt_tokens = [row[(a > 0) & (m == 0)] for row, a, m in zip(ids, attn, loss)]
    pad_id, eos_id = special_token_ids(tok, pad_token=cfg.tokenizer.pad_token)
    width = max(len(t) for t in prompt_tokens)
    prompt_ids = np.full((k, width), pad_id, np.int32)
    prompt_mask = np.zeros((k, width), np.int32)
    for i, tokens in enumerate(prompt_tokens):  # left-padded, as the sampler wants
        prompt_ids[i, width - len(tokens):] = tokens
        prompt_mask[i, width - len(tokens):] = 1
    references = _decoder(tok)(ids, ((attn > 0) & (loss > 0)).astype(np.int32))
    return sft_sample_fn(lm, prompt_ids, prompt_mask, decode=_decoder(tok),
                         max_new_tokens=max(cfg.data.max_length - width, 1), references=references,
                         eos_token_id=eos_id, pad_token_id=pad_id)


def _execute_reward(plan: Plan, *, overwrite: bool) -> str:
    from rlhf_jax.train.drivers import fit_reward, mesh_from_options
    from rlhf_jax.train.reward import evaluate_reward_model, normalize_reward_head

    cfg, tok, train, held_out = plan.cfg, plan.tokenizer, plan.train, plan.held_out
    _report(f"reward: {len(train)} training pairs, {len(held_out) if held_out else 0} held-out pairs")
    with _claim(plan, overwrite=overwrite) as folder:
        mesh = mesh_from_options(cfg.run)
        rm, params = load_model(cfg.model, head="scalar", seed=cfg.run.seed, mesh=mesh,
                                param_dtype=_lora_param_dtype(cfg))
        _check_model_vocab(tok, rm)
        rm, params, frozen = with_lora(cfg, rm, params, seed=cfg.run.seed)
        params, _ = fit_reward(rm, params, train.arrays, cfg.train, cfg.run, mesh=mesh,
                               eval_data=held_out.arrays if held_out else None,
                               on_checkpoint=folder.commit_overwrite, frozen=frozen)
        rm, params = merged_lora(cfg, rm, params, frozen)  # LoRA: the adapters folded into the base
        if cfg.normalize:
            # Centre the scores on the training responses (both sides), as the OpenAI and N+ recipes
            # centre on reference samples; PPO then sees scores around 0.
            ids = np.concatenate([train.arrays["chosen_ids"], train.arrays["rejected_ids"]])
            mask = np.concatenate([train.arrays["chosen_mask"], train.arrays["rejected_mask"]])
            params = normalize_reward_head(rm, params, ids, mask)
        summary = {}
        if held_out is not None:
            summary = {k: float(v) for k, v in evaluate_reward_model(rm, params, held_out.arrays).items()}
            _report("reward: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary.items())))
        with open(os.path.join(cfg.run.output_dir, "reward_eval.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        out = export_model(rm, params, tok, os.path.join(cfg.run.output_dir, "hf"))
        folder.commit_overwrite()
    return out


def _execute_dpo(plan: Plan, *, overwrite: bool) -> str:
    from rlhf_jax.train.drivers import fit_dpo, mesh_from_options

    cfg, tok, train = plan.cfg, plan.tokenizer, plan.train
    _report(f"dpo: {len(train)} preference pairs of length {train.arrays['chosen_ids'].shape[1]}"
            + (f" ({train.dropped} dropped as too long)" if train.dropped else "")
            + (f"; reference {cfg.reference}" if cfg.reference else "; reference: the starting model"))
    with _claim(plan, overwrite=overwrite) as folder:
        mesh = mesh_from_options(cfg.run)
        lm, params = load_model(cfg.model, head="lm", seed=cfg.run.seed, mesh=mesh,
                                param_dtype=_lora_param_dtype(cfg))
        _check_model_vocab(tok, lm)
        lm, params, frozen = with_lora(cfg, lm, params, seed=cfg.run.seed)  # LoRA: the base is the reference
        ref_params = None
        if cfg.reference is not None and cfg.train.needs_reference:
            import jax

            _, ref_params = load_pretrained(cfg.reference, head="lm", dtype=lm.dtype, param_dtype=lm.param_dtype,
                                            mesh=mesh)
            shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
            if shapes(ref_params) != shapes(params):
                raise ConfigError(f"`reference`: {cfg.reference} does not have the starting model's architecture "
                                  "(its parameters differ in names or shapes)")
        params, _ = fit_dpo(lm, params, train.arrays, cfg.train, cfg.run, ref_params=ref_params, mesh=mesh,
                            on_checkpoint=folder.commit_overwrite, frozen=frozen)
        _export_lora_adapter(cfg, lm, params, os.path.join(cfg.run.output_dir, "peft"))
        out = export_model(*merged_lora(cfg, lm, params, frozen), tok, os.path.join(cfg.run.output_dir, "hf"))
        folder.commit_overwrite()
    return out


def _build_ppo(cfg, tok, prompts, reward_fn=None, mesh=None):
    """The PPO trainer, its models and params, from a resolved PPORunConfig.

    Dtypes: the policy and a separate value network train with `model.param_dtype` master
    weights; the frozen reference and reward model are stored in `model.frozen_dtype`; every
    network computes in `model.dtype`. With `mesh`, checkpoints load straight into their shards.
    With `lora:` the returned policy params are the trained part (adapters, a shared-trunk
    value head) and the reference params the frozen base (in `model.frozen_dtype`).
    """
    import jax
    import jax.numpy as jnp

    from rlhf_jax.rewards.functions import host_reward_fn, load_reward_model
    from rlhf_jax.train.rl.config import RLConfig
    from rlhf_jax.train.rl.ppo import PPOTrainer
    from rlhf_jax.train.rl.trainer import RLTrainer
    from rlhf_jax.train.state import optimizer_from_config

    ppo_cfg = cfg.train
    rl = isinstance(ppo_cfg, RLConfig)
    critic = ppo_cfg.advantages.needs_critic if rl else True
    shared = critic and cfg.value_model is None
    head = "lm+value" if shared else "lm"
    model_cfg = cfg.model
    compute, frozen = _dtype(model_cfg.dtype), _dtype(getattr(model_cfg, "frozen_dtype", model_cfg.param_dtype))
    policy, policy_params = load_model(model_cfg, head=head, seed=cfg.run.seed, mesh=mesh,
                                       param_dtype=_lora_param_dtype(cfg))
    _check_model_vocab(tok, policy)
    lora = getattr(cfg, "lora", None) is not None
    if lora:
        # the adapters (and a shared-trunk value head) train; the frozen base is the reference
        policy, policy_params, ref_params = with_lora(cfg, policy, policy_params, seed=cfg.run.seed)
    elif cfg.reference is None:
        # a copy in the frozen dtype (never the policy's own buffers: the update replaces those)
        ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=frozen), policy_params)
    else:
        _, ref_params = load_pretrained(cfg.reference, head=head, dtype=compute, param_dtype=frozen,
                                        mesh=mesh)
    value_model = value_params = value_tx = None
    if critic and not shared:
        value_path = cfg.reward.model_path if cfg.value_model == "reward_model" else cfg.value_model
        value_model, value_params = load_pretrained(
            value_path, head="scalar", seed=cfg.run.seed + 1, dtype=compute,
            param_dtype=_dtype(model_cfg.param_dtype), remat=getattr(model_cfg, "remat", "none"), mesh=mesh)
        value_tx = optimizer_from_config(ppo_cfg.value_optimizer_config)
    reward_model = reward_params = host_fn = None
    if cfg.reward.model_path is not None:
        reward_model, reward_params = load_reward_model(cfg.reward.model_path, dtype=compute, param_dtype=frozen)
        _check_model_vocab(tok, reward_model)
    else:
        host_fn = host_reward_fn(reward_fn or _load_function(cfg.reward.function, "reward.function"), tok,
                                 prompts=prompts.prompts, answers=prompts.answers, name=cfg.reward.function)
    source = (f"reward.model_path={cfg.reward.model_path}" if cfg.reward.model_path is not None
              else f"reward.function={cfg.reward.function}")
    trainer = (RLTrainer if rl else PPOTrainer)(
        policy, ppo_cfg, optimizer_from_config(ppo_cfg.optimizer), value_model=value_model, value_tx=value_tx,
        reward_model=reward_model, reward_fn=host_fn, reward_source=source)
    return trainer, policy, policy_params, ref_params, value_params, reward_params


def _execute_ppo(plan: Plan, *, overwrite: bool) -> str:
    from rlhf_jax.train.drivers import fit_ppo, mesh_from_options

    cfg, tok, prompts = plan.cfg, plan.tokenizer, plan.train
    _report(f"{plan.command}: {len(prompts)} prompts of length {prompts.arrays['prompt_ids'].shape[1]}")
    with _claim(plan, overwrite=overwrite) as folder:
        mesh = mesh_from_options(cfg.run)
        trainer, policy, policy_params, ref_params, value_params, reward_params = _build_ppo(
            cfg, tok, prompts, plan.reward_fn, mesh=mesh)
        eval_fn = None
        if plan.held_out is not None:
            eval_fn = _ppo_eval_fn(cfg, tok, plan, trainer, policy, ref_params, reward_params)
        params, _ = fit_ppo(trainer, policy_params, ref_params, prompts.arrays, cfg.run, mesh=mesh,
                            value_params=value_params,
                            reward_params=reward_params, num_epochs=None, max_steps=cfg.num_iterations,
                            on_checkpoint=folder.commit_overwrite, eval_fn=eval_fn, decode=_decoder(tok))
        frozen = ref_params if trainer.lora else None
        _export_lora_adapter(cfg, policy, params, os.path.join(cfg.run.output_dir, "peft"))
        out = export_model(*merged_lora(cfg, policy, params, frozen), tok, os.path.join(cfg.run.output_dir, "hf"))
        folder.commit_overwrite()
    return out


def _ppo_eval_fn(cfg, tok, plan: Plan, trainer, policy, ref_params, reward_params):
    """`eval_fn(params)` on the held-out prompts: verifier pass@1 and score, or RM score; KL to the reference."""
    from rlhf_jax.eval.training_eval import rl_eval_fn
    from rlhf_jax.rewards.functions import host_reward_fn

    held_out = plan.held_out
    reward_fn = reward_model = None
    if trainer.reward_model is not None:
        reward_model = (trainer.reward_model, reward_params)
    else:
        reward_fn = host_reward_fn(plan.reward_fn or _load_function(cfg.reward.function, "reward.function"), tok,
                                   prompts=held_out.prompts, answers=held_out.answers, name=cfg.reward.function)
    sampling = cfg.train.sampling
    reference = trainer.reference  # with LoRA: the base without adapters, on the frozen base
    return rl_eval_fn(policy, held_out.arrays["prompt_ids"], held_out.arrays["prompt_mask"],
                      max_new_tokens=sampling.max_new_tokens, reward_fn=reward_fn, reward_model=reward_model,
                      ref=(reference, ref_params), temperature=sampling.temperature,
                      eos_token_id=sampling.eos_token_id, pad_token_id=sampling.pad_token_id,
                      seed=cfg.run.seed + 1, batch_size=cfg.train.batch.batch_size,
                      prompt_index=np.arange(len(held_out)))


def _execute_eval(plan: Plan, *, overwrite: bool) -> str:
    import jax

    from rlhf_jax.eval.passk_eval import evaluate_pass_at_k, write_eval
    from rlhf_jax.rewards.functions import host_reward_fn

    cfg, tok, prompts = plan.cfg, plan.tokenizer, plan.train
    pad_id, eos_id = special_token_ids(tok, pad_token=cfg.tokenizer.pad_token)
    verifier = host_reward_fn(plan.reward_fn, tok, prompts=prompts.prompts, answers=prompts.answers,
                              name=cfg.verifier)
    with claim_run_folder("eval", cfg, cfg.output_dir, overwrite=overwrite) as folder:
        models = {m.name: _policy_from_path(m.path) for m in cfg.models}
        ref = reward_model = None
        if cfg.reference is not None:
            ref = _policy_from_path(cfg.reference)
        if cfg.reward_model is not None:
            reward_model = load_pretrained(_reward_export(cfg.reward_model), head="scalar")
        results = evaluate_pass_at_k(
            models, prompts.arrays["prompt_ids"], prompts.arrays["prompt_mask"], verifier,
            n_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, key=jax.random.key(cfg.seed),
            temperature=cfg.temperature, ks=list(cfg.ks) if cfg.ks else None, ref=ref,
            reward_model=reward_model, batch_size=cfg.batch_size, eos_token_id=eos_id, pad_token_id=pad_id,
            prompt_index=np.arange(len(prompts)), num_bootstrap=cfg.bootstrap)
        paths = write_eval(results, cfg.output_dir, title=f"pass@k on {', '.join(cfg.data.train_files)}")
        folder.commit_overwrite()
    return paths["json"]


def _restored_params(command: str, run_cfg, params, tok):
    """The parameters in the newest checkpoint of a training run (template: a fresh state)."""
    from rlhf_jax.io.checkpoint import Checkpointer
    from rlhf_jax.train.state import TrainState, optimizer_from_config

    ckpt_dir = os.path.join(run_cfg.run.output_dir, "checkpoints")
    if command in ("ppo", "rl"):
        class _Prompts:  # the export needs the trainer's state layout, not its data
            prompts, answers = ("",), (None,)

        cfg = dataclasses.replace(run_cfg, reward=dataclasses.replace(
            run_cfg.reward, model_path=None, function="rlhf_jax.rewards.verifiers:math_reward"))
        if run_cfg.value_model == "reward_model":
            cfg = dataclasses.replace(cfg, value_model=run_cfg.reward.model_path)
        trainer, _, policy_params, _, value_params, _ = _build_ppo(cfg, tok, _Prompts)
        template = trainer.init(policy_params, value_params)
    else:
        import jax

        tx = optimizer_from_config(run_cfg.train.optimizer, total_steps=1)
        template = TrainState(params=params, opt_state=tx.init(params), step=np.zeros((), np.int32),
                              rng=jax.random.key(run_cfg.run.seed))
    if not os.path.isdir(ckpt_dir):
        raise RunError(f"{run_cfg.run.output_dir} has no checkpoints/ folder (the run saved none yet)")
    # Read-only: the run may still be going (a live run folder is never modified from here).
    with Checkpointer(ckpt_dir, max_to_keep=None, async_save=False, allow_config_mismatch=True,
                      read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise RunError(f"{ckpt_dir} holds no checkpoint to export")
        state, _ = ckpt.restore(template, step=step)
    return state.params, step


def load_run_model(run_dir: str):
    """The model of a training run folder at its newest checkpoint (a LoRA run's adapters
    merged into its base).

    Returns:
      `(command, lm, params, tokenizer, step)`.
    """
    command, run_cfg = read_run(run_dir)
    run_cfg = dataclasses.replace(run_cfg, run=dataclasses.replace(run_cfg.run, output_dir=run_dir))
    tok = load_tokenizer(run_cfg.tokenizer, run_cfg.model)
    if command in ("ppo", "rl"):
        critic = command == "ppo" or run_cfg.train.advantages.needs_critic
        head = "lm+value" if (critic and run_cfg.value_model is None) else "lm"
    else:
        head = "lm" if command in ("sft", "dpo") else "scalar"
    lm, params = load_model(run_cfg.model, head=head, seed=run_cfg.run.seed, param_dtype=_lora_param_dtype(run_cfg))
    lm, params, frozen = with_lora(run_cfg, lm, params, seed=run_cfg.run.seed)
    params, step = _restored_params(command, run_cfg, params, tok)
    lm, params = merged_lora(run_cfg, lm, params, frozen)  # a LoRA run: its adapters folded into the base
    return command, lm, params, tok, step


def _policy_from_path(path: str):
    """`(lm, params)` of a policy: an HF folder, or a run folder (its hf/ export, else its newest checkpoint)."""
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        if os.path.isdir(os.path.join(path, "hf")):
            path = os.path.join(path, "hf")
        else:
            command, lm, params, _, step = load_run_model(path)
            if command == "reward":
                raise RunError(f"{path} is a reward-model run, not a policy")
            _report(f"eval: {path} has no hf/ export yet; using its checkpoint at step {step}")
            if lm.head == "lm+value":
                lm, params = lm.with_head("lm", params)
            return lm, params
    return load_pretrained(path, head="lm")


def _tokenizer_source(path: str) -> str:
    """Where the tokenizer of a model path lives (run folders: hf/, else the run's tokenizer)."""
    if not os.path.isfile(os.path.join(path, RUN_FILE)):
        return path
    if os.path.isdir(os.path.join(path, "hf")):
        return os.path.join(path, "hf")
    _, run_cfg = read_run(path)
    return run_cfg.tokenizer.path or run_cfg.model.path


def _execute_export(plan: Plan, *, overwrite: bool) -> str:
    cfg = plan.cfg
    out = cfg.output_dir
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise RunError(f"output_dir {out} is not empty; pass --overwrite to write into it")
    command, lm, params, tok, step = load_run_model(cfg.run_dir)
    export_model(lm, params, tok, out, save_dtype=_dtype(cfg.dtype) if cfg.dtype != "float32" else None)
    _report(f"export: {command} run {cfg.run_dir}, checkpoint step {step} -> {out}")
    return out

"""The stages behind `rlhf-jax`: data -> model -> driver -> HF export.

Each `run_<command>(cfg, *, overwrite)` takes a validated config from
`rlhf_jax.cli.config`, loads the tokenizer and the data first (so bad rows fail
before a model is built), claims the run folder (`prepare_output_dir`),
builds the models, calls the driver of `rlhf_jax.train.drivers` (which logs,
checkpoints and resumes) and writes the final model in HF format to
`output_dir/hf/`. `run_eval` wires `rlhf_jax.eval.passk_eval`, `run_export`
re-exports a finished run.

Run folders (claiming, resuming, refusing) are `rlhf_jax.cli.run_folder`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rlhf_jax.cli.config import ConfigError
from rlhf_jax.cli.run_folder import CONFIG_FILE, RUN_FILE, RunError, prepare_output_dir, read_run  # noqa: F401
from rlhf_jax.data.datasets import (
    preference_examples,
    prompt_examples,
    read_sources,
    sft_examples,
    special_token_ids,
)

__all__ = [
    "RunError",
    "CONFIG_FILE",
    "RUN_FILE",
    "prepare_output_dir",
    "read_run",
    "load_tokenizer",
    "load_model",
    "run_sft",
    "run_reward",
    "run_ppo",
    "run_eval",
    "run_export",
    "load_run_model",
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
    except (OSError, ValueError) as e:
        raise RunError(f"cannot load a tokenizer from {path!r} (tokenizer.path / model.path): "
                       f"{' '.join(str(e).split())[:300]}") from None
    if tokenizer_cfg.pad_token is not None:
        special_token_ids(tok, pad_token=tokenizer_cfg.pad_token)  # checks it exists and differs from EOS
        tok.pad_token = tokenizer_cfg.pad_token
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


def _data_kwargs(data, *, kind: str, pad_token=None) -> dict:
    common = {"prompt_column": data.prompt_column, "max_prompt_length": data.max_prompt_length,
              "buckets": data.buckets, "chat_template": data.chat_template, "pad_token": pad_token,
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


def _mesh(mesh_cfg):
    import jax

    from rlhf_jax.train.sharding import make_mesh

    tensor = getattr(mesh_cfg, "tensor", 1)
    if jax.device_count() == 1 and mesh_cfg.fsdp == 1 and tensor == 1 and mesh_cfg.data in (-1, 1):
        return None
    return make_mesh(data=None if mesh_cfg.data == -1 else mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=tensor)


def _report(message: str):
    print(f"[rlhf-jax] {message}", flush=True)


def _driver_kwargs(cfg, mesh=None) -> dict:
    return {"output_dir": cfg.output_dir, "mesh": mesh if mesh is not None else _mesh(cfg.mesh),
            "checkpoint_every": cfg.checkpoint_every,
            "keep": cfg.keep, "log_every": cfg.log_every, "resume": True}


# --------------------------------------------------------------------------- the stages


def run_sft(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax sft`: returns the HF export folder (`output_dir/hf`)."""
    from rlhf_jax.train.drivers import fit_sft
    from rlhf_jax.train.state import check_vocab

    tok = load_tokenizer(cfg.tokenizer, cfg.model)
    train, _ = _load_examples(cfg.data, tok, kind="sft", pad_token=cfg.tokenizer.pad_token)
    _report(f"sft: {len(train)} examples of length {train.arrays['input_ids'].shape[1]}"
            + (f" ({train.dropped} dropped as too long)" if train.dropped else ""))
    if cfg.model.path is not None:
        _check_exists(cfg.model.path, "model folder")
    resumed = prepare_output_dir("sft", cfg, overwrite=overwrite)
    if resumed:
        _report(f"resuming the run in {cfg.output_dir}")
    mesh = _mesh(cfg.mesh)
    lm, params = load_model(cfg.model, head="lm", seed=cfg.train.seed, mesh=mesh)
    check_vocab(tok, lm)
    params, _ = fit_sft(lm, params, train.arrays, cfg.train, **_driver_kwargs(cfg, mesh))
    return export_model(lm, params, tok, os.path.join(cfg.output_dir, "hf"))


def run_reward(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax reward`: returns the HF export folder (a *ForSequenceClassification)."""
    from rlhf_jax.train.drivers import fit_reward
    from rlhf_jax.train.reward import evaluate_reward_model, normalize_reward_head
    from rlhf_jax.train.state import check_vocab

    tok = load_tokenizer(cfg.tokenizer, cfg.model)
    train, held_out = _load_examples(cfg.data, tok, kind="preference", pad_token=cfg.tokenizer.pad_token)
    _report(f"reward: {len(train)} training pairs, {len(held_out) if held_out else 0} held-out pairs")
    if cfg.model.path is not None:
        _check_exists(cfg.model.path, "model folder")
    resumed = prepare_output_dir("reward", cfg, overwrite=overwrite)
    if resumed:
        _report(f"resuming the run in {cfg.output_dir}")
    mesh = _mesh(cfg.mesh)
    rm, params = load_model(cfg.model, head="scalar", seed=cfg.train.seed, mesh=mesh)
    check_vocab(tok, rm)
    params, _ = fit_reward(rm, params, train.arrays, cfg.train,
                           eval_data=held_out.arrays if held_out else None, **_driver_kwargs(cfg, mesh))
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
    with open(os.path.join(cfg.output_dir, "reward_eval.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return export_model(rm, params, tok, os.path.join(cfg.output_dir, "hf"))


def _build_ppo(cfg, tok, prompts, mesh=None):
    """The PPO trainer, its models and params, from a PPORunConfig.

    Dtypes: the policy and a separate value network train with `model.param_dtype` master
    weights; the frozen reference and reward model are stored in `model.frozen_dtype`; every
    network computes in `model.dtype`. With `mesh`, checkpoints load straight into their shards
    (the frozen networks FSDP-sharded like the trained ones).
    """
    import jax
    import jax.numpy as jnp

    from rlhf_jax.rewards.functions import host_reward_fn, load_function, load_reward_model
    from rlhf_jax.train.rl.ppo import PPOTrainer
    from rlhf_jax.train.state import check_vocab, optimizer_from_config

    pad_id, eos_id = special_token_ids(tok, pad_token=cfg.tokenizer.pad_token)
    ppo_cfg = dataclasses.replace(
        cfg.train, pad_token_id=pad_id,
        eos_token_id=eos_id if cfg.train.eos_token_id is None else cfg.train.eos_token_id)
    shared = cfg.value_model is None
    head = "lm+value" if shared else "lm"
    model_cfg = cfg.model
    compute, frozen = _dtype(model_cfg.dtype), _dtype(getattr(model_cfg, "frozen_dtype", model_cfg.param_dtype))
    policy, policy_params = load_model(model_cfg, head=head, seed=ppo_cfg.seed, mesh=mesh)
    check_vocab(tok, policy)
    if cfg.reference is None:
        # a copy in the frozen dtype (never the policy's own buffers: the update replaces those)
        ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=frozen), policy_params)
    else:
        _, ref_params = load_pretrained(cfg.reference, head=head, dtype=compute, param_dtype=frozen,
                                        mesh=mesh)
    value_model = value_params = value_tx = None
    if not shared:
        value_path = cfg.reward.model_path if cfg.value_model == "reward_model" else cfg.value_model
        value_model, value_params = load_pretrained(
            value_path, head="scalar", seed=ppo_cfg.seed + 1, dtype=compute,
            param_dtype=_dtype(model_cfg.param_dtype), remat=getattr(model_cfg, "remat", "none"), mesh=mesh)
        value_tx = optimizer_from_config(ppo_cfg, prefix="value_")
    reward_model = reward_params = reward_fn = None
    if cfg.reward.model_path is not None:
        reward_model, reward_params = load_reward_model(cfg.reward.model_path, dtype=compute, param_dtype=frozen)
        check_vocab(tok, reward_model)
    else:
        reward_fn = host_reward_fn(load_function(cfg.reward.function), tok, prompts=prompts.prompts,
                                   answers=prompts.answers, name=cfg.reward.function)
    trainer = PPOTrainer(policy, ppo_cfg, optimizer_from_config(ppo_cfg), value_model=value_model,
                         value_tx=value_tx, reward_model=reward_model, reward_fn=reward_fn)
    return trainer, policy, policy_params, ref_params, value_params, reward_params


def run_ppo(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax ppo`: returns the HF export folder of the policy (a *ForCausalLM)."""
    from rlhf_jax.train.drivers import fit_ppo

    tok = load_tokenizer(cfg.tokenizer, cfg.model)
    prompts, _ = _load_examples(cfg.data, tok, kind="prompt", pad_token=cfg.tokenizer.pad_token)
    _report(f"ppo: {len(prompts)} prompts of length {prompts.arrays['prompt_ids'].shape[1]}")
    # Bad paths and a bad `module:function` fail before the run folder is claimed.
    for what, path in (("model folder", cfg.model.path), ("reference folder", cfg.reference),
                       ("reward model folder", cfg.reward.model_path),
                       ("value model folder", None if cfg.value_model in (None, "reward_model") else cfg.value_model)):
        if path is not None:
            _check_exists(path, what)
    if cfg.reward.function is not None:
        from rlhf_jax.rewards.functions import load_function

        load_function(cfg.reward.function)
    resumed = prepare_output_dir("ppo", cfg, overwrite=overwrite)
    if resumed:
        _report(f"resuming the run in {cfg.output_dir}")
    mesh = _mesh(cfg.mesh)
    trainer, policy, policy_params, ref_params, value_params, reward_params = _build_ppo(cfg, tok, prompts, mesh)
    params, _ = fit_ppo(trainer, policy_params, ref_params, prompts.arrays, value_params=value_params,
                        reward_params=reward_params, num_epochs=None, max_steps=cfg.num_iterations,
                        **_driver_kwargs(cfg, mesh))
    return export_model(policy, params, tok, os.path.join(cfg.output_dir, "hf"))


def run_eval(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax eval`: pass@k of every model; returns the path of eval.json."""
    import jax

    from rlhf_jax.eval.passk_eval import evaluate_pass_at_k, write_eval
    from rlhf_jax.rewards.functions import host_reward_fn, load_function

    tok = load_tokenizer(cfg.tokenizer, fallback=_tokenizer_source(cfg.models[0].path))
    prompts, _ = _load_examples(cfg.data, tok, kind="prompt", pad_token=cfg.tokenizer.pad_token)
    pad_id, eos_id = special_token_ids(tok, pad_token=cfg.tokenizer.pad_token)
    verifier = host_reward_fn(load_function(cfg.verifier), tok, prompts=prompts.prompts,
                              answers=prompts.answers, name=cfg.verifier)
    for path in [m.path for m in cfg.models] + [cfg.reference, cfg.reward_model]:
        if path is not None:
            _check_exists(path, "model folder")
    prepare_output_dir("eval", cfg, overwrite=overwrite)
    models = {m.name: _policy_from_path(m.path) for m in cfg.models}
    ref = reward_model = None
    if cfg.reference is not None:
        ref = _policy_from_path(cfg.reference)
    if cfg.reward_model is not None:
        path = cfg.reward_model
        if os.path.isfile(os.path.join(path, RUN_FILE)) and os.path.isdir(os.path.join(path, "hf")):
            path = os.path.join(path, "hf")  # a reward run folder: its normalised export
        reward_model = load_pretrained(path, head="scalar")
    results = evaluate_pass_at_k(
        models, prompts.arrays["prompt_ids"], prompts.arrays["prompt_mask"], verifier,
        n_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, key=jax.random.key(cfg.seed),
        temperature=cfg.temperature, ks=list(cfg.ks) if cfg.ks else None, ref=ref,
        reward_model=reward_model, batch_size=cfg.batch_size, eos_token_id=eos_id, pad_token_id=pad_id,
        prompt_index=np.arange(len(prompts)), num_bootstrap=cfg.bootstrap)
    paths = write_eval(results, cfg.output_dir, title=f"pass@k on {', '.join(cfg.data.train_files)}")
    return paths["json"]


def _restored_params(command: str, run_cfg, params, tok):
    """The parameters in the newest checkpoint of a training run (template: a fresh state)."""
    from rlhf_jax.io.checkpoint import Checkpointer
    from rlhf_jax.train.state import TrainState, optimizer_from_config

    ckpt_dir = os.path.join(run_cfg.output_dir, "checkpoints")
    if command == "ppo":
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

        tx = optimizer_from_config(dataclasses.replace(run_cfg.train, total_steps=run_cfg.train.total_steps or 1))
        template = TrainState(params=params, opt_state=tx.init(params), step=np.zeros((), np.int32),
                              rng=jax.random.key(run_cfg.train.seed))
    if not os.path.isdir(ckpt_dir):
        raise RunError(f"{run_cfg.output_dir} has no checkpoints/ folder (the run saved none yet)")
    # Read-only: the run may still be going (a live run folder is never modified from here).
    with Checkpointer(ckpt_dir, max_to_keep=None, async_save=False, allow_config_mismatch=True,
                      read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise RunError(f"{ckpt_dir} holds no checkpoint to export")
        state, _ = ckpt.restore(template, step=step)
    return state.params, step


def load_run_model(run_dir: str):
    """The model of a training run folder at its newest checkpoint.

    Returns:
      `(command, lm, params, tokenizer, step)`.
    """
    command, run_cfg = read_run(run_dir)
    run_cfg = dataclasses.replace(run_cfg, output_dir=run_dir)
    tok = load_tokenizer(run_cfg.tokenizer, run_cfg.model)
    if command == "ppo":
        head = "lm+value" if run_cfg.value_model is None else "lm"
    else:
        head = "lm" if command == "sft" else "scalar"
    lm, params = load_model(run_cfg.model, head=head, seed=run_cfg.train.seed)
    params, step = _restored_params(command, run_cfg, params, tok)
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


def run_export(cfg, *, overwrite: bool = False) -> str:
    """`rlhf-jax export`: the newest checkpoint of `run_dir` as an HF folder; returns the folder."""
    out = cfg.output_dir
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise RunError(f"output_dir {out} is not empty; pass --overwrite to write into it")
    command, lm, params, tok, step = load_run_model(cfg.run_dir)
    export_model(lm, params, tok, out, save_dtype=_dtype(cfg.dtype) if cfg.dtype != "float32" else None)
    _report(f"export: {command} run {cfg.run_dir}, checkpoint step {step} -> {out}")
    return out

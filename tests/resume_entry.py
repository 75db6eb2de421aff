"""Subprocess entry point of tests/test_resume.py (not a test module).

Runs a tiny, fully seeded SFT or PPO training with `fit_sft` / `fit_ppo` and
saves the final params to `<output_dir>/final_params.npz`. With
`--kill_at S` the process sends itself SIGKILL from the `on_step` hook of
step S: after the records of steps < S are written and possibly while an
asynchronous checkpoint is still being written, like a crash or a pre-empted
job (`--wait_for_checkpoint K` first waits until checkpoint K is committed).

    python tests/resume_entry.py sft OUT --steps 10 --checkpoint_every 3 [--kill_at 8]
"""
from __future__ import annotations

import argparse
import os
import signal
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

VOCAB = 32


def _tiny_lm(head: str):
    from rlhf_jax.models import ModelConfig, from_config

    cfg = ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                           max_position_embeddings=32)
    return from_config(cfg, head=head, seed=0)


def _kill_hook(args):
    def on_step(step, metrics):
        if args.kill_at is not None and step == args.kill_at:
            if args.wait_for_checkpoint is not None:
                # an asynchronous save finishes in the background: wait until the step
                # directory is committed (renamed from its temporary name), at most 60 s
                done = os.path.join(args.output_dir, "checkpoints", str(args.wait_for_checkpoint))
                deadline = time.monotonic() + 60.0
                while not os.path.isdir(done) and time.monotonic() < deadline:
                    time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        return None
    return on_step


def run_sft(args):
    from rlhf_jax.train import OptimizerConfig, RunOptions, SFTConfig
    from rlhf_jax.train.drivers import fit_sft

    lm, lm_params = _tiny_lm("lm")
    rng = np.random.default_rng(0)
    n, length = 20, 10
    lengths = rng.integers(5, length + 1, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(3, VOCAB, (n, length)), 0).astype(np.int32)
    loss_mask = mask * (np.arange(length)[None, :] >= 2)
    cfg = SFTConfig(batch_size=4, num_epochs=3, optimizer=OptimizerConfig(learning_rate=3e-3, schedule="cosine",
                                                                           warmup_steps=2))
    run = RunOptions(output_dir=args.output_dir, seed=1, checkpoint_every=args.checkpoint_every, tensorboard=False)
    params, _ = fit_sft(lm, lm_params, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask},
                        cfg, run, max_steps=args.steps, on_step=_kill_hook(args))
    return params


def run_ppo(args):
    from helpers import ppo_config

    from rlhf_jax.train import PPOTrainer, RunOptions, optimizer_from_config
    from rlhf_jax.train.drivers import fit_ppo

    policy, policy_params = _tiny_lm("lm+value")
    target = 5

    def reward_fn(prompt_ids, prompt_mask, tokens, response_mask, prompt_index):
        return ((tokens == target) * response_mask).sum(1) / np.maximum(response_mask.sum(1), 1)

    cfg = ppo_config(batch_size=4, num_minibatches=2, ppo_epochs=2, max_new_tokens=4,
                     temperature=1.0, eos_token_id=2, pad_token_id=0, learning_rate=1e-3,
                     kl_coef=0.05, kl_target=0.1)
    trainer = PPOTrainer(policy, cfg, optimizer_from_config(cfg.optimizer), reward_fn=reward_fn)
    rng = np.random.default_rng(1)
    n, p = 12, 4
    lengths = rng.integers(1, p + 1, n)
    mask = (np.arange(p)[None, ::-1] < lengths[:, None]).astype(np.int32)  # left padding
    ids = np.where(mask > 0, rng.integers(3, VOCAB, (n, p)), 0).astype(np.int32)
    run = RunOptions(output_dir=args.output_dir, seed=3, checkpoint_every=args.checkpoint_every, tensorboard=False)
    params, _ = fit_ppo(trainer, policy_params, policy_params, {"prompt_ids": ids, "prompt_mask": mask}, run,
                        max_steps=args.steps, on_step=_kill_hook(args))
    return params


def run_grpo(args):
    """The RL trainer (GRPO, groups of 4, DAPO's dynamic sampling refilling from fresh prompts)."""
    from rlhf_jax.train import RunOptions, make_optimizer
    from rlhf_jax.train.drivers import fit_ppo
    from rlhf_jax.train.rl.presets import rl_config
    from rlhf_jax.train.rl.trainer import RLTrainer

    policy, policy_params = _tiny_lm("lm")
    target = 5

    def reward_fn(prompt_ids, prompt_mask, tokens, response_mask, prompt_index):
        score = ((tokens == target) * response_mask).sum(1) / np.maximum(response_mask.sum(1), 1)
        return np.where(prompt_index % 3 == 0, 1.0, score)  # every third prompt: an all-equal group

    cfg = rl_config("grpo", {
        "batch": {"batch_size": 2, "group_size": 4, "num_minibatches": 2, "ppo_epochs": 2},
        "sampling": {"max_new_tokens": 4, "temperature": 1.0, "eos_token_id": 2},
        "rewards": {"dynamic_sampling": True, "dynamic_sampling_max_tries": 3},
    })
    trainer = RLTrainer(policy, cfg, make_optimizer(1e-3, schedule="constant"), reward_fn=reward_fn)
    rng = np.random.default_rng(1)
    n, p = 12, 4
    lengths = rng.integers(1, p + 1, n)
    mask = (np.arange(p)[None, ::-1] < lengths[:, None]).astype(np.int32)  # left padding
    ids = np.where(mask > 0, rng.integers(3, VOCAB, (n, p)), 0).astype(np.int32)
    run = RunOptions(output_dir=args.output_dir, seed=3, checkpoint_every=args.checkpoint_every, tensorboard=False)
    params, _ = fit_ppo(trainer, policy_params, policy_params, {"prompt_ids": ids, "prompt_mask": mask}, run,
                        max_steps=args.steps, on_step=_kill_hook(args))
    return params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("sft", "ppo", "grpo"))
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint_every", type=int, required=True)
    parser.add_argument("--kill_at", type=int, default=None)
    parser.add_argument("--wait_for_checkpoint", type=int, default=None)
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args()
    if args.cache_dir:  # share compiled executables between the test's subprocesses
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    params = {"sft": run_sft, "ppo": run_ppo, "grpo": run_grpo}[args.mode](args)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    np.savez(os.path.join(args.output_dir, "final_params.npz"),
             **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})


if __name__ == "__main__":
    main()

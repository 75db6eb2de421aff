"""Training run of tests/test_scale.py (not a test module): in-process on one device, or as a
subprocess that is one of two processes sharing a 2 x 2 x 2 mesh.

`train(out_dir, mesh)` runs two SFT steps and two PPO iterations (tiny Llama, reward model,
separate value network) and returns the SFT losses, the PPO metrics and the final params of
both, gathered to the host. The test calls it in-process with `mesh=None` (one device) and
starts two subprocesses of this file:

    python tests/scale_entry.py OUT --process_id I --port P  # process I of 2 (4 devices each)

which join with `jax.distributed.initialize` over 127.0.0.1 (CPU devices, gloo collectives)
into one 2 x 2 x 2 (data x fsdp x tensor) mesh of their 8 devices; process 0 compiles each
program and shares the executable with process 1, and saves the result to `OUT/multi.npz`.
"""
from __future__ import annotations

import argparse
import os

VOCAB = 48


def train(out_dir: str, mesh) -> dict:
    """SFT (2 steps) then PPO (2 iterations) on `mesh` (None: one device); metrics and params."""
    import jax
    import numpy as np

    from rlhf_jax.models import ModelConfig, from_config
    from rlhf_jax.train import BatchConfig, OptimizerConfig, RunOptions, SamplingConfig
    from rlhf_jax.train.drivers import fit_ppo, fit_sft
    from rlhf_jax.train.rl.ppo import PPOConfig, PPOTrainer
    from rlhf_jax.train.sft import SFTConfig
    from rlhf_jax.train.state import optimizer_from_config

    # two layers, so that a rule splitting the stacked layer axis would show
    cfg = ModelConfig.tiny("llama", VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=64)
    quiet = dict(stdout=False, tensorboard=False, progress=False, checkpoint_every=None, log_every=1,
                 async_checkpoint=False)
    rng = np.random.default_rng(0)
    result = {}

    lm, params = from_config(cfg, head="lm", seed=0)
    ids = rng.integers(1, VOCAB, (16, 12)).astype(np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    sft_cfg = SFTConfig(batch_size=8, num_epochs=1, optimizer=OptimizerConfig(learning_rate=1e-2))
    sft_run = RunOptions(output_dir=os.path.join(out_dir, "sft"), **quiet)
    sft_params, history = fit_sft(lm, params, data, sft_cfg, sft_run, mesh=mesh)
    result["sft_loss"] = np.array([r["loss"] for r in history])
    for path, leaf in jax.tree_util.tree_leaves_with_path(sft_params):
        result["sft" + jax.tree_util.keystr(path)] = _host(leaf)

    policy, policy_params = from_config(cfg, head="lm", seed=1)
    value, value_params = from_config(cfg, head="scalar", seed=2)
    rm, rm_params = from_config(cfg, head="scalar", seed=3)
    ppo_cfg = PPOConfig(batch=BatchConfig(batch_size=8, num_minibatches=2, ppo_epochs=1),
                        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0, eos_token_id=VOCAB - 1,
                                                pad_token_id=0),
                        optimizer=OptimizerConfig(learning_rate=1e-3))
    trainer = PPOTrainer(policy, ppo_cfg, optimizer_from_config(ppo_cfg.optimizer), value_model=value,
                         value_tx=optimizer_from_config(ppo_cfg.value_optimizer_config), reward_model=rm)
    prompts = rng.integers(1, VOCAB - 1, (16, 6)).astype(np.int32)
    mask = np.ones_like(prompts)
    mask[:4, :2] = 0  # some left padding
    prompts = np.where(mask > 0, prompts, 0)
    ppo_params, history = fit_ppo(trainer, policy_params, policy_params, {"prompt_ids": prompts, "prompt_mask": mask},
                                  RunOptions(output_dir=os.path.join(out_dir, "ppo"), **quiet),
                                  value_params=value_params, reward_params=rm_params, mesh=mesh, max_steps=2)
    for key in ("score_mean", "kl_k1", "loss", "values_mean"):
        result["ppo_" + key] = np.array([r[key] for r in history])
    for path, leaf in jax.tree_util.tree_leaves_with_path(ppo_params):
        result["ppo" + jax.tree_util.keystr(path)] = _host(leaf)
    return result


def _host(x):
    """The whole array on this host (gathered across processes when it is split over them)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=4", *inherited])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                               process_id=args.process_id, local_device_ids=list(range(4)))
    from rlhf_jax.train.sharding import make_mesh

    result = train(os.path.join(args.out, f"multi{args.process_id}"), make_mesh(data=2, fsdp=2, tensor=2))
    if args.process_id == 0:
        np.savez(os.path.join(args.out, "multi.npz"), **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

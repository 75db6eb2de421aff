"""Training: pure jittable steps (SFT, reward model, DPO, PPO), their states and configs.

Steps are built by factories that close over static things (the model, the optimizer,
the config) and return pure `(state, batch) -> (state, metrics)` functions:

    tx = make_optimizer(1e-4, warmup_steps=10, total_steps=1000)
    lm, params = from_config(ModelConfig.tiny("gpt2", vocab_size=64))
    state = sft_init(lm, params, tx, seed=0)
    step = jax.jit(make_sft_step(lm, tx, SFTConfig()))
    state, metrics = step(state, batch)

PPO is a small object with three jitted phases (`PPOTrainer.iteration`).
`OptimizerConfig` (nested in every trainer config) and `RunOptions` (what every driver
shares: output folder, checkpoints, logging, seed, mesh) are in `train/options.py`; the
drivers (fit_*) in `train/drivers.py`, sharding in `train/sharding.py`, checkpoints in
`rlhf_jax/io/checkpoint.py`.
"""
from rlhf_jax.train.dpo import DPOConfig, dpo_init, make_dpo_step, pair_logprobs, reference_logprobs
from rlhf_jax.train.options import MeshOptions, OptimizerConfig, RunOptions
from rlhf_jax.train.reward import (
    RewardConfig,
    evaluate_reward_model,
    make_reward_step,
    normalize_reward_head,
    reward_init,
)
from rlhf_jax.train.rl.ppo import (
    AdvantageConfig,
    BatchConfig,
    KLConfig,
    LossConfig,
    PPOBatch,
    PPOConfig,
    PPOState,
    PPOTrainer,
    RewardShapingConfig,
    SamplingConfig,
    ppo_advantages,
    ppo_minibatch_loss,
)
from rlhf_jax.train.sft import SFTConfig, make_sft_step, sft_init, sft_loss_fn
from rlhf_jax.train.state import (
    TrainState,
    accumulate_gradients,
    check_vocab,
    guarded_apply,
    init_train_state,
    learning_rate_from_state,
    make_optimizer,
    model_context_length,
    optimizer_from_config,
    split_micro_batches,
    tree_all_finite,
)

__all__ = [
    "DPOConfig",
    "dpo_init",
    "make_dpo_step",
    "pair_logprobs",
    "reference_logprobs",
    "OptimizerConfig",
    "RunOptions",
    "MeshOptions",
    "BatchConfig",
    "SamplingConfig",
    "LossConfig",
    "KLConfig",
    "RewardShapingConfig",
    "AdvantageConfig",
    "PPOBatch",
    "PPOConfig",
    "PPOState",
    "PPOTrainer",
    "ppo_advantages",
    "ppo_minibatch_loss",
    "RewardConfig",
    "evaluate_reward_model",
    "make_reward_step",
    "normalize_reward_head",
    "reward_init",
    "SFTConfig",
    "make_sft_step",
    "sft_init",
    "init_train_state",
    "sft_loss_fn",
    "TrainState",
    "accumulate_gradients",
    "check_vocab",
    "guarded_apply",
    "learning_rate_from_state",
    "make_optimizer",
    "model_context_length",
    "optimizer_from_config",
    "split_micro_batches",
    "tree_all_finite",
]

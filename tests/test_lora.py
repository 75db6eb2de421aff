"""LoRA: adapters on the scanned trunk, training with a frozen base, merged and PEFT export.

The HF tests build tiny random Llama and GPT-2 checkpoints with torch (weights scrambled to
O(0.1)), put non-zero adapters on them (B is zero at init, so a parity at init would prove
nothing), and compare our unmerged forward with (a) the merged checkpoint loaded by
transformers and (b) the PEFT adapter folder loaded by ``peft`` onto the HF base model.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft  # the test extras pin it: a missing peft is a failure, not a skip
import pytest
import torch
import transformers

from rlhf_jax.models import LoRAConfig, ModelConfig, add_lora, from_config, from_pretrained, lora, save_pretrained
from rlhf_jax.models.hf.peft import load_peft_adapter, save_peft_adapter
from rlhf_jax.train import (
    BatchConfig,
    KLConfig,
    OptimizerConfig,
    PPOConfig,
    PPOTrainer,
    RunOptions,
    SamplingConfig,
    optimizer_from_config,
)
from rlhf_jax.train.reward import RewardConfig, make_reward_step, reward_init
from rlhf_jax.train.sft import SFTConfig

VOCAB = 64
TOL = 1e-4


def _batch(b=3, t=10, vocab=VOCAB, seed=0):
    """Left-padded ids and mask: rows with 0, 2 and 5 padding tokens."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :2] = 0
    mask[2 % b, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def _perturb(adapters, seed=1, scale=0.2):
    """Adapters with both A and B random (the effect of some training)."""
    leaves, tree = jax.tree.flatten(adapters)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(scale * rs.standard_normal(x.shape), jnp.float32)
                                     for x in leaves])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapted_equals_base_at_init(family):
    base_lm, base = from_config(ModelConfig.tiny(family, VOCAB), seed=0)
    cfg = LoRAConfig(rank=4, alpha=8, targets=lora.LLAMA_TARGETS if family == "llama" else lora.GPT2_TARGETS)
    lm, adapters = add_lora(base_lm, cfg, seed=3)
    assert lm.base == base_lm and hash(lm) != hash(base_lm) and lm == dataclasses.replace(base_lm, lora=cfg)
    layers = base_lm.config.num_layers
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    expected = 7 if family == "llama" else 4
    assert len(flat) == 2 * expected
    for path, leaf in flat:
        assert leaf.shape[0] == layers and leaf.dtype == jnp.float32  # stacked like the base
        if path[-1].key == "lora_b":
            assert not np.any(np.asarray(leaf))
        else:  # Kaiming-uniform as PEFT: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / np.sqrt(leaf.shape[1])
            a = np.asarray(leaf)
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    ids, mask = _batch()
    adapted = jax.jit(lm.logits)  # one compilation for both adapter values (not one per eager op)
    ref = np.asarray(jax.jit(base_lm.logits)(base, jnp.asarray(ids), jnp.asarray(mask)))
    ours = np.asarray(adapted(lora.combine(base, adapters), jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(ours, ref)
    # the adapters act once B is not zero
    moved = np.asarray(adapted(lora.combine(base, _perturb(adapters)), jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(moved - ref).max() > 1e-2


def test_config_scale_targets_and_errors():
    assert LoRAConfig(rank=4, alpha=8).scale == 2.0
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    assert LoRAConfig(targets=["q_proj", "v_proj"]).targets == ("q_proj", "v_proj")
    base_lm, base = from_config(ModelConfig.tiny("llama", VOCAB))
    lm, adapters = add_lora(base_lm, LoRAConfig(rank=2, targets=("q_proj", "v_proj")))
    assert lora.adapter_paths(adapters) == ["trunk/layers/self_attn/q_proj", "trunk/layers/self_attn/v_proj"]
    with pytest.raises(ValueError, match="match no projection"):
        add_lora(base_lm, LoRAConfig(targets="c_attn"))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(lm, LoRAConfig())
    with pytest.raises(ValueError, match="in both trees"):
        lora.combine(base, {"trunk": {"norm": {"scale": base["trunk"]["norm"]["scale"]}}})


def _scramble(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_model(family):
    tf = transformers
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=64))
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, max_position_embeddings=64,
                                              tie_word_embeddings=False, attention_bias=True))


def _hf_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


@pytest.mark.parametrize("family,use_rslora", [("llama", False), ("gpt2", True)])
def test_merged_and_peft_exports_match_our_forward(family, use_rslora, tmp_path):
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    _scramble(_hf_model(family)).save_pretrained(base_dir)
    base_lm, base = from_pretrained(base_dir)
    targets = lora.LLAMA_TARGETS if family == "llama" else lora.GPT2_TARGETS
    lm, adapters = add_lora(base_lm, LoRAConfig(rank=4, alpha=8, targets=targets, use_rslora=use_rslora))
    adapters = _perturb(adapters)
    params = lora.combine(base, adapters)
    ids, mask = _batch()
    ours = np.asarray(jax.jit(lm.logits)(params, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask > 0
    base_logits = np.asarray(jax.jit(base_lm.logits)(base, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - base_logits)[valid].max() > 0.1  # the adapters matter

    merged_dir = save_pretrained(lm, params, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    err_merged = np.abs(_hf_logits(merged, ids, mask) - ours)[valid].max()
    assert err_merged < TOL, err_merged

    adapter_dir = save_peft_adapter(lm, adapters, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is use_rslora
    names = [n for n, _ in lora_names(adapter_dir)]
    first = ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" if family == "llama"
             else "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight")
    assert first in names and len(names) == 2 * 2 * (7 if family == "llama" else 4)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    err_peft = np.abs(_hf_logits(peft_model, ids, mask) - ours)[valid].max()
    assert err_peft < TOL, err_peft
    print(f"{family}: max |logit diff| merged {err_merged:.2e}, peft {err_peft:.2e}")

    # and back: the folder loads onto our base with the same adapters
    lm2, adapters2 = load_peft_adapter(base_lm, adapter_dir)
    assert lm2.lora.scale == lm.lora.scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b)), adapters2, adapters)


def lora_names(folder):
    from rlhf_jax.models.hf.pretrained import read_safetensors

    return list(read_safetensors(folder / "adapter_model.safetensors"))


def test_fit_sft_with_a_frozen_base_trains_only_the_adapters_and_reduces_the_loss(tmp_path):
    """`fit_sft(..., frozen=base)`: the trained pytree and its optimizer state are the adapters
    only, the bf16 base is an argument that never changes, and the loss goes down."""
    from rlhf_jax.train.drivers import fit_sft
    from rlhf_jax.train.sft import sft_loss_fn

    base_lm, base = from_config(ModelConfig.tiny("llama", VOCAB), seed=0)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)  # the frozen base stored in bf16
    lm, adapters = add_lora(base_lm, LoRAConfig(rank=4, alpha=16, targets=lora.LLAMA_TARGETS), seed=0)
    rs = np.random.RandomState(0)
    ids = rs.randint(1, VOCAB, (4, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    cfg = SFTConfig(batch_size=4, num_epochs=8, optimizer=OptimizerConfig(learning_rate=3e-3))
    run = RunOptions(output_dir=str(tmp_path), checkpoint_every=None, stdout=False, tensorboard=False,
                     progress=False)
    base_before = jax.tree.map(np.asarray, base)
    trained, history, state = fit_sft(lm, adapters, batch, cfg, run, frozen=base, return_state=True)
    # the trained pytree (and its optimizer state) is the adapters only
    n_trained, n_base = lora.num_params(trained), lora.num_params(base)
    assert n_trained == sum(np.prod(x.shape) for x in jax.tree.leaves(adapters))
    assert jax.tree.structure(trained) == jax.tree.structure(adapters)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    assert not any(x.shape == base["trunk"]["embed_tokens"]["embedding"].shape
                   for x in jax.tree.leaves(state.opt_state) if hasattr(x, "shape"))
    print(f"trained fraction {n_trained / (n_trained + n_base):.4f} ({n_trained} of {n_trained + n_base})")
    losses = [r["loss"] for r in history]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses
    # the base is untouched (an argument, never updated); every adapter moved
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), base, base_before)
    for before, after in zip(jax.tree.leaves(adapters), jax.tree.leaves(trained)):
        assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0
    # the gradient w.r.t. the full params reaches the base too: training only the adapters
    # is the trainer's choice (frozen is an argument), not a stop_gradient in the model
    grads = jax.jit(jax.grad(lambda p: sft_loss_fn(lm, p, batch)[0]))(lora.combine(base, trained))
    assert float(jnp.abs(grads["trunk"]["layers"]["mlp"]["up_proj"]["kernel"].astype(jnp.float32)).max()) > 0


def test_reward_model_trains_adapters_and_the_new_head():
    base_lm, base = from_config(ModelConfig.tiny("gpt2", VOCAB), seed=0)
    rm0, rm_params = base_lm.with_head("scalar", base, seed=1)
    rm, adapters = add_lora(rm0, LoRAConfig(rank=2, alpha=4, targets=lora.GPT2_TARGETS))
    trainable, frozen = lora.partition(lora.combine(rm_params, adapters), heads=("score",))
    assert "score" in trainable and "score" not in frozen and "trunk" in frozen
    cfg = RewardConfig(batch_size=4, optimizer=OptimizerConfig(learning_rate=1e-2))
    tx = optimizer_from_config(cfg.optimizer)
    state = reward_init(rm, trainable, tx)
    rs = np.random.RandomState(0)
    ids = rs.randint(1, VOCAB, (8, 10)).astype(np.int32)
    batch = {"chosen_ids": ids[:4], "chosen_mask": np.ones((4, 10), np.int32),
             "rejected_ids": ids[4:], "rejected_mask": np.ones((4, 10), np.int32)}
    step = jax.jit(make_reward_step(rm, tx, cfg))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    assert np.abs(np.asarray(state.params["score"]["kernel"] - trainable["score"]["kernel"])).max() > 0
    assert lora.num_params(state.params) == lora.num_params(adapters) + lora.num_params(rm_params["score"])


def test_ppo_with_a_lora_policy_uses_the_base_as_reference():
    v, b, p, n = 16, 8, 4, 6
    config = ModelConfig.tiny("gpt2", v, hidden_size=32, num_heads=2, max_position_embeddings=16)
    base_lm, base = from_config(config, head="lm+value", seed=0)
    policy, adapters = add_lora(base_lm, LoRAConfig(rank=2, alpha=4, targets="c_attn|c_fc"))
    trainable, frozen = lora.partition(lora.combine(base, adapters), heads=("value_head",))
    cfg = PPOConfig(batch=BatchConfig(batch_size=b, num_minibatches=2, ppo_epochs=2),
                    sampling=SamplingConfig(max_new_tokens=n, temperature=1.0, eos_token_id=2, pad_token_id=0),
                    kl=KLConfig(kl_coef=0.05), optimizer=OptimizerConfig(learning_rate=1e-2))
    trainer = PPOTrainer(policy, cfg, optimizer_from_config(cfg.optimizer),
                         reward_fn=lambda pi, pm, tok, m, idx: ((tok == 5) * m).sum(1) / np.maximum(m.sum(1), 1))
    assert trainer.reference == lora.reference_lm(policy) and trainer.reference.lora is None
    state = trainer.init(trainable)
    prompts = np.random.default_rng(0).integers(3, v, (b, p)).astype(np.int32)
    mask = np.ones((b, p), np.int32)
    frozen_before = jax.tree.map(np.asarray, frozen)
    state, metrics, _ = trainer.iteration(state, prompts, mask, ref_params=frozen, prompt_index=np.arange(b))
    # at init the adapted policy is the reference: the rollout KL is zero
    assert abs(float(metrics["kl_k1"])) < 1e-5 and abs(float(metrics["kl_k3"])) < 1e-5
    state, metrics, _ = trainer.iteration(state, prompts, mask, ref_params=frozen, prompt_index=np.arange(b))
    assert all(np.isfinite(float(x)) for x in metrics.values())
    assert float(metrics["kl_k3"]) > 0  # the adapters moved the policy away from the base
    assert jax.tree.structure(state.params) == jax.tree.structure(trainable)
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), c), frozen, frozen_before)


def test_critic_free_trainer_with_a_lora_policy_needs_the_base_and_trains_the_adapters():
    """GRPO (no critic, so the policy's log-probs come from `response_logprobs`, not the
    shared-trunk path PPO takes above) on adapters over a frozen base.

    One estimator stands for all critic-free ones: what LoRA changes (the policy runs on
    `combine(base, adapters)`, the reference is the base, `ref_params` is required) is the
    same code for each; the estimators themselves learn in tests/test_rl_trainer.py."""
    from rlhf_jax.train import make_optimizer
    from rlhf_jax.train.rl.presets import rl_config
    from rlhf_jax.train.rl.trainer import RLTrainer

    v, b, g, p, n = 16, 2, 4, 4, 6
    config = ModelConfig.tiny("gpt2", v, hidden_size=32, num_heads=2, max_position_embeddings=16)
    base_lm, base = from_config(config, head="lm", seed=0)
    policy, adapters = add_lora(base_lm, LoRAConfig(rank=2, alpha=4, targets="c_attn|c_fc"))
    cfg = rl_config("grpo", {
        "batch": {"batch_size": b, "group_size": g, "num_minibatches": 1, "ppo_epochs": 2},
        "sampling": {"max_new_tokens": n, "temperature": 1.0, "eos_token_id": 2, "pad_token_id": 0},
    })
    trainer = RLTrainer(policy, cfg, make_optimizer(1e-2, schedule="constant"),
                        reward_fn=lambda pi, pm, tok, m, idx: ((tok == 5) * m).sum(1) / np.maximum(m.sum(1), 1))
    state = trainer.init(adapters)
    prompts = np.random.default_rng(0).integers(3, v, (b, p)).astype(np.int32)
    mask = np.ones((b, p), np.int32)
    with pytest.raises(ValueError, match="frozen base"):
        trainer.iteration(state, prompts, mask, prompt_index=np.arange(b))
    for _ in range(2):
        state, metrics, rollout = trainer.iteration(state, prompts, mask, ref_params=base,
                                                    prompt_index=np.arange(b))
        assert all(np.isfinite(float(x)) for x in metrics.values())
    assert np.asarray(rollout.tokens).shape == (b * g, n)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    moved = max(float(jnp.abs(a - c).max()) for a, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(adapters)))
    assert moved > 0


def test_fit_dpo_with_a_frozen_base_trains_the_adapters_against_the_base(tmp_path):
    """DPO with LoRA: the reference is the base without adapters on the same frozen weights
    (precomputed log-probs), so the first loss is log 2 exactly; only the adapters move."""
    from rlhf_jax.train.dpo import DPOConfig
    from rlhf_jax.train.drivers import fit_dpo

    base_lm, base = from_config(ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, num_heads=2), seed=0)
    lm, adapters = add_lora(base_lm, LoRAConfig(rank=2, alpha=4, targets=lora.GPT2_TARGETS))
    rs = np.random.RandomState(4)
    data = {}
    for side in ("chosen", "rejected"):
        ids = rs.randint(3, VOCAB, (8, 10)).astype(np.int32)
        data.update({f"{side}_ids": ids, f"{side}_mask": np.ones_like(ids),
                     f"{side}_loss_mask": (np.arange(10)[None, :] >= 4).astype(np.int32).repeat(8, 0)})
    cfg = DPOConfig(batch_size=4, num_epochs=2, optimizer=OptimizerConfig(learning_rate=2e-2))
    run = RunOptions(output_dir=str(tmp_path), checkpoint_every=None, stdout=False, tensorboard=False,
                     progress=False)
    with pytest.raises(ValueError, match="reference is the frozen base"):
        fit_dpo(lm, adapters, data, cfg, run, frozen=base, ref_params=base)
    trained, history = fit_dpo(lm, adapters, data, cfg, run, frozen=base)
    assert abs(history[0]["loss"] - np.log(2.0)) < 1e-6
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["margin"] > 0
    assert jax.tree.structure(trained) == jax.tree.structure(adapters)

"""A PPO-RLHF iteration composed by hand from rlhf_jax functions (the README example)."""
import jax
import jax.numpy as jnp
import optax

import rlhf_jax as rj
from rlhf_jax.models import ModelConfig, from_config

lm, params = from_config(ModelConfig.tiny("gpt2", vocab_size=32), head="lm+value", seed=0)
ref_params, tx = params, optax.adam(3e-3)
opt_state, ctl = tx.init(params), rj.kl_controller_init(0.05, target=1.0)
prompt_ids, prompt_mask = jnp.full((32, 4), 7, jnp.int32), jnp.ones((32, 4), jnp.int32)
P, N, T = 4, 8, 0.7                                   # prompt length, response length, temperature

@jax.jit
def ppo_iteration(params, opt_state, ctl, key):
    out = rj.generate(lm, params, prompt_ids, prompt_mask, key, max_new_tokens=N,
                      temperature=T, eos_token_id=2, pad_token_id=0)
    ids = jnp.concatenate([prompt_ids, out.tokens], 1)
    mask = jnp.concatenate([prompt_mask, out.mask.astype(jnp.int32)], 1)
    scores = (out.tokens == 5).sum(1) / N                           # a programmatic reward
    ref_logprobs = lm.response_logprobs(ref_params, ids, mask, N, temperature=T)
    rewards, kl = rj.shaped_rewards(scores, out.logprobs, ref_logprobs, out.mask, kl_coef=ctl.kl_coef)
    values = lm.values(params, ids, mask)[:, P - 1:-1]              # V(state before each token)
    advantages, returns = rj.gae(rewards, values, out.mask, gamma=1.0, lam=0.95)
    advantages = rj.masked_whiten(advantages, out.mask)

    def loss_fn(p):
        logprobs = lm.response_logprobs(p, ids, mask, N, temperature=T)
        pg_loss, aux = rj.ppo_policy_loss(logprobs, out.logprobs, advantages, out.mask)
        v_loss, _ = rj.ppo_value_loss(lm.values(p, ids, mask)[:, P - 1:-1], values, returns, out.mask)
        return pg_loss + 0.1 * v_loss, aux

    def epoch(carry, _):                                            # one PPO epoch on the whole batch
        params, opt_state = carry
        grads, aux = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), aux

    (params, opt_state), aux = jax.lax.scan(epoch, (params, opt_state), length=4)  # 4 epochs, compiled once
    aux = jax.tree.map(lambda x: x[-1], aux)                        # the last epoch's clipfrac, KL, ...
    ctl = rj.kl_controller_update(ctl, kl.sum(1).mean(), prompt_ids.shape[0])
    return params, opt_state, ctl, scores.mean(), aux

history = []
for i in range(30):
    params, opt_state, ctl, score, aux = ppo_iteration(params, opt_state, ctl, jax.random.key(i))
    history.append(float(score))
print(f"score {history[0]:.2f} -> {history[-1]:.2f}, kl_coef {float(ctl.kl_coef):.4f}")

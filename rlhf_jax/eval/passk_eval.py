"""pass@k evaluation of language models with a verifier, and its report.

`evaluate_pass_at_k` samples `n_samples` responses per prompt from each model
(the prompts are repeated `n` times and cut into fixed-size batches, so the
sampler compiles once per model value and settings, and runs as one jitted
call per batch), asks a host verifier which are correct, and computes the unbiased
pass@k curve for every k = 1..n with percentile-bootstrap confidence
intervals over prompts (`rlhf_jax.core.passk`). Optionally, in the same jitted
pass, it measures the KL divergence to a reference model and the score of a
reward model, and it averages any extra host scorers (e.g. a gold
annotator).

`write_eval` writes `eval.json`, prints a table, and draws pass@k against k
on a log2 axis with one line and confidence band per model.

Every model sees the same PRNG key per batch, so the comparison between
models uses common random numbers (less noise in the difference).

The verifier and the scorers use the host reward signature of
`rlhf_jax.train` (`fn(prompt_ids, prompt_mask, response_tokens,
response_mask, prompt_index) -> np.ndarray [B]`); a sample is correct when
the verifier's value is above `success_threshold` (0.5: booleans, 0/1
rewards and -1/+1 rewards all work).

References:
  Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
  arXiv 2107.03374 (unbiased pass@k). Yue et al. 2025, "Does Reinforcement
  Learning Really Incentivize Reasoning Capacity in LLMs Beyond the Base
  Model?", arXiv 2504.13837.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.core.passk import pass_at_k_bootstrap
from rlhf_jax.models.shared_prompt import grouped_response_logprobs
from rlhf_jax.rollout import generate

__all__ = ["evaluate_pass_at_k", "write_eval", "format_table", "plot_pass_at_k", "default_ks"]


def default_ks(n: int) -> list[int]:
    """Powers of two up to `n`, and `n` itself: the k of the summary table."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks if ks[-1] == n else ks + [n]


def _tile_to_batches(num_rows: int, batch_size: int) -> tuple[np.ndarray, int]:
    """Row indices covering `num_rows` rows in whole batches (wrapping around at the end)."""
    num_batches = -(-num_rows // batch_size)
    return np.arange(num_batches * batch_size) % num_rows, num_batches


_SAMPLER_STATIC = ("lm", "ref_lm", "reward_lm", "max_new_tokens", "temperature", "eos_token_id", "pad_token_id",
                   "group")


def _sample_and_score(params, ref_params, reward_params, prompt_ids, prompt_mask, key, *, lm, ref_lm,
                      reward_lm, max_new_tokens, temperature, eos_token_id, pad_token_id, group=1):
    """Sample a batch, then reference log-probs and reward scores (the models are static).

    With `group = G > 1` the `[B, P]` prompts are `B / G` distinct prompts, each repeated
    G times in a row: each is prefilled once (`generate(num_samples=G)`) and the reference
    forward runs it once per group (`grouped_response_logprobs`)."""
    if group > 1:
        rollout = generate(
            lm, params, prompt_ids[::group], prompt_mask[::group], key,
            max_new_tokens=max_new_tokens, temperature=temperature,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_samples=group,
        )
    else:
        rollout = generate(
            lm, params, prompt_ids, prompt_mask, key,
            max_new_tokens=max_new_tokens, temperature=temperature,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
    out = {"tokens": rollout.tokens, "mask": rollout.mask, "ended_with_eos": rollout.ended_with_eos}
    input_ids = jnp.concatenate([prompt_ids, rollout.tokens], axis=1)
    attention_mask = jnp.concatenate(
        [jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(rollout.mask > 0, jnp.int32)], axis=1
    )
    if ref_lm is not None:
        # Greedy sampling has no distribution to compare; use the untempered one then.
        temp = temperature if temperature > 0 else 1.0
        if group > 1:
            ref_logprobs = grouped_response_logprobs(ref_lm, ref_params, input_ids, attention_mask,
                                                     max_new_tokens, group, temperature=temp)
        else:
            ref_logprobs = ref_lm.response_logprobs(
                ref_params, input_ids, attention_mask, max_new_tokens, temperature=temp
            )
        # k1 summed over the response: an unbiased estimate of KL(policy || ref) per sequence.
        out["kl"] = jnp.sum((rollout.logprobs - ref_logprobs) * rollout.mask, axis=1)
    if reward_lm is not None:
        out["rm_score"] = jnp.asarray(reward_lm.scores(reward_params, input_ids, attention_mask), jnp.float32)
    return out


# Models and settings are static arguments: jax.jit's cache keys on them by value, so a
# second evaluation with equal models and settings does not compile again.
_sample_and_score_jit = jax.jit(_sample_and_score, static_argnames=_SAMPLER_STATIC)
_SAMPLER_NAME = "jit(_sample_and_score)"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _count_sampler_compiles(count: list):
    """Add to `count[0]` each XLA compilation of the sampler while the block runs.

    Counted from JAX's public monitoring events (the backend-compile event names the function).
    """
    def listener(event, duration_secs, **kwargs):
        del duration_secs
        if event == _COMPILE_EVENT and kwargs.get("fun_name") == _SAMPLER_NAME:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def evaluate_pass_at_k(
    models: Mapping[str, tuple],
    prompt_ids,
    prompt_mask,
    verifier: Callable[..., np.ndarray],
    *,
    n_samples: int,
    max_new_tokens: int,
    key,
    temperature: float = 1.0,
    ks=None,
    ref: tuple | None = None,
    reward_model: tuple | None = None,
    scorers: Mapping[str, Callable[..., np.ndarray]] | None = None,
    batch_size: int = 1024,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    prompt_index=None,
    success_threshold: float = 0.5,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    num_examples: int = 8,
    share_prompts: bool = False,
    progress: bool = False,
) -> dict:
    """Samples `n_samples` responses per prompt from every model and scores them.

    pass@k per prompt is `1 - C(n - c, k) / C(n, k)` with `c` correct samples
    out of `n`; the curve is its mean over prompts for k = 1..n, with a
    bootstrap interval over prompts.

    Args:
      models: name -> `(lm, params)`; the LMs need an "lm" head (or "lm+value").
      prompt_ids: `[P, L]` int, left-padded prompts.
      prompt_mask: `[P, L]`, 1 on real prompt tokens.
      verifier: host function `(prompt_ids, prompt_mask, response_tokens,
        response_mask, prompt_index) -> [B]`; correct where the value is above
        `success_threshold`.
      n_samples: samples per prompt (n); the curve covers k = 1..n.
      max_new_tokens: sampling budget per response.
      key: PRNG key (the same for every model: common random numbers).
      temperature: sampling temperature (> 0 for pass@k to make sense).
      ks: the k reported in `pass_at_k` (default `default_ks(n_samples)`).
      ref: optional `(lm, params)` of the reference; adds the mean per-sequence
        KL(model || ref), estimated with k1 = sum_t (logp - ref_logp) on the
        model's own samples, at the same temperature.
      reward_model: optional `(scalar-head lm, params)`; adds its mean score.
      scorers: optional name -> host function (same signature as `verifier`)
        whose per-sample values are averaged (e.g. a gold annotator's score).
      batch_size: rows per sampling call; the `P * n` rows are padded to whole
        batches by repeating rows (their results are dropped).
      eos_token_id, pad_token_id: passed to `rlhf_jax.generate`.
      prompt_index: `[P]` data-set row of every prompt, passed to the verifier
        (default `arange(P)`).
      success_threshold: verifier values above it count as correct.
      num_bootstrap, confidence: the bootstrap over prompts.
      num_examples: how many samples (of the first prompts) to keep per model.
      share_prompts: prefill each prompt once for its `n_samples` samples (and run the
        reference forward once per prompt), as `generate(num_samples=n)` does: far less work
        when prompts are long next to responses. Needs `batch_size` (after capping at the
        number of rows) to be a multiple of `n_samples`. The samples are other draws than
        without it (the random numbers are laid out per group), equally valid.
      progress: show a tqdm bar over the sampling batches.

    Returns:
      `{"settings": {...}, "models": {name: {...}}}` of plain Python values, per
      model: `pass_at_k` (str(k) -> mean), `pass_at_k_ci` (str(k) -> [lo, hi]),
      `curve` (`k`, `mean`, `lower`, `upper` lists for k = 1..n),
      `correct_per_prompt`, `accuracy` (= pass@1), `response_length`,
      `eos_fraction`, `examples` (token lists), and when asked `kl_to_ref`,
      `rm_score` and each scorer (each as `{"mean", "std"}`).
    """
    prompt_ids = np.asarray(prompt_ids)
    prompt_mask = np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"`prompt_ids` must be [P, L] and `prompt_mask` the same shape, got "
            f"{prompt_ids.shape} and {prompt_mask.shape}"
        )
    if not models:
        raise ValueError("`models` is empty")
    if n_samples < 1:
        raise ValueError(f"`n_samples` must be >= 1, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    num_prompts = prompt_ids.shape[0]
    if prompt_index is None:
        prompt_index = np.arange(num_prompts)
    prompt_index = np.asarray(prompt_index)
    if prompt_index.shape != (num_prompts,):
        raise ValueError(f"`prompt_index` must have shape ({num_prompts},), got {prompt_index.shape}")
    ks = default_ks(n_samples) if ks is None else sorted({int(k) for k in ks})
    if ks[0] < 1 or ks[-1] > n_samples:
        raise ValueError(f"every k must be in [1, n_samples={n_samples}], got {ks}")
    scorers = dict(scorers or {})

    # Row r is sample r % n of prompt r // n.
    num_rows = num_prompts * n_samples
    batch_size = min(batch_size, num_rows)
    if share_prompts and batch_size % n_samples:
        raise ValueError(f"`share_prompts` needs `batch_size` ({batch_size}) to be a multiple of `n_samples` "
                         f"({n_samples}), so that every batch holds whole prompts")
    group = n_samples if share_prompts else 1
    rows, num_batches = _tile_to_batches(num_rows, batch_size)
    row_prompt = rows // n_samples
    ref_lm, ref_params = ref if ref is not None else (None, None)
    reward_lm, reward_params = reward_model if reward_model is not None else (None, None)

    compilations = [0]
    results = {}
    for name, (lm, params) in models.items():
        static = dict(lm=lm, ref_lm=ref_lm, reward_lm=reward_lm, max_new_tokens=int(max_new_tokens),
                      temperature=float(temperature), eos_token_id=eos_token_id, pad_token_id=int(pad_token_id),
                      group=group)
        pieces: dict[str, list] = {}
        batches = range(num_batches)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"pass@k {name}", unit="batch", dynamic_ncols=True)
        with _count_sampler_compiles(compilations):
            for b in batches:
                sel = row_prompt[b * batch_size : (b + 1) * batch_size]
                out = _sample_and_score_jit(
                    params, ref_params, reward_params,
                    jnp.asarray(prompt_ids[sel], jnp.int32), jnp.asarray(prompt_mask[sel], jnp.int32),
                    jax.random.fold_in(key, b), **static,
                )
                for field, value in jax.device_get(out).items():
                    pieces.setdefault(field, []).append(np.asarray(value))
        arrays = {field: np.concatenate(parts)[:num_rows] for field, parts in pieces.items()}
        host_args = (
            prompt_ids[row_prompt[:num_rows]], prompt_mask[row_prompt[:num_rows]],
            arrays["tokens"], arrays["mask"], prompt_index[row_prompt[:num_rows]],
        )
        verdict = np.asarray(verifier(*host_args), dtype=np.float64)
        if verdict.shape != (num_rows,):
            raise ValueError(f"the verifier returned shape {verdict.shape}, expected ({num_rows},)")
        correct = (verdict > success_threshold).reshape(num_prompts, n_samples)
        counts = correct.sum(axis=1)
        all_k = np.arange(1, n_samples + 1)
        mean, lower, upper = pass_at_k_bootstrap(
            n_samples, counts, all_k, num_samples=num_bootstrap, confidence=confidence, seed=0
        )
        lengths = arrays["mask"].sum(axis=1)
        entry = {
            "pass_at_k": {str(k): float(mean[k - 1]) for k in ks},
            "pass_at_k_ci": {str(k): [float(lower[k - 1]), float(upper[k - 1])] for k in ks},
            "curve": {
                "k": all_k.tolist(),
                "mean": mean.tolist(),
                "lower": lower.tolist(),
                "upper": upper.tolist(),
            },
            "correct_per_prompt": counts.tolist(),
            "accuracy": float(correct.mean()),
            "response_length": float(lengths.mean()),
            "eos_fraction": float(arrays["ended_with_eos"].mean()),
            "examples": [
                arrays["tokens"][i, : int(lengths[i])].tolist() for i in range(min(num_examples, num_rows))
            ],
        }
        if "kl" in arrays:
            entry["kl_to_ref"] = _summary(arrays["kl"])
        if "rm_score" in arrays:
            entry["rm_score"] = _summary(arrays["rm_score"])
        for scorer_name, scorer in scorers.items():
            values = np.asarray(scorer(*host_args), dtype=np.float64)
            if values.shape != (num_rows,):
                raise ValueError(f"scorer {scorer_name!r} returned shape {values.shape}, expected ({num_rows},)")
            entry[scorer_name] = _summary(values)
        results[name] = entry
    return {
        "settings": {
            "n_samples": int(n_samples),
            "num_prompts": int(num_prompts),
            "temperature": float(temperature),
            "max_new_tokens": int(max_new_tokens),
            "ks": ks,
            "confidence": float(confidence),
            "num_bootstrap": int(num_bootstrap),
            "success_threshold": float(success_threshold),
            "share_prompts": bool(share_prompts),
            "kl_estimator": "k1 summed over response tokens, on the model's samples",
            # XLA compilations of the sampling function during this call, counted from JAX's
            # monitoring events (at most 1 when the models are equal `LM` values: the fixed
            # batch shape compiles once; 0 when an earlier call already compiled it).
            "sampler_compilations": int(compilations[0]),
        },
        "models": results,
    }


def format_table(results: dict) -> str:
    """A fixed-width text table: one row per model, pass@k with its interval, KL and RM score."""
    ks = results["settings"]["ks"]
    models = results["models"]
    has_kl = any("kl_to_ref" in m for m in models.values())
    has_rm = any("rm_score" in m for m in models.values())
    name_width = max(5, *(len(name) for name in models))
    header = f"{'model':<{name_width}}" + "".join(f"  {'pass@' + str(k):>19}" for k in ks)
    if has_kl:
        header += f"  {'KL(ref)':>8}"
    if has_rm:
        header += f"  {'RM score':>8}"
    lines = [header, "-" * len(header)]
    for name, entry in models.items():
        line = f"{name:<{name_width}}"
        for k in ks:
            lo, hi = entry["pass_at_k_ci"][str(k)]
            line += f"  {entry['pass_at_k'][str(k)]:.3f} [{lo:.3f},{hi:.3f}]"
        if has_kl:
            line += f"  {entry['kl_to_ref']['mean']:8.3f}" if "kl_to_ref" in entry else f"  {'-':>8}"
        if has_rm:
            line += f"  {entry['rm_score']['mean']:8.3f}" if "rm_score" in entry else f"  {'-':>8}"
        lines.append(line)
    settings = results["settings"]
    lines.append(
        f"({settings['num_prompts']} prompts x {settings['n_samples']} samples, temperature "
        f"{settings['temperature']}, {int(settings['confidence'] * 100)}% bootstrap intervals over prompts)"
    )
    return "\n".join(lines)


def plot_pass_at_k(results: dict, path: str, *, title: str | None = None) -> str:
    """Draws pass@k against k (log2 axis), one line and confidence band per model; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=110)
    for name, entry in results["models"].items():
        curve = entry["curve"]
        (line,) = ax.plot(curve["k"], curve["mean"], label=name, linewidth=1.8)
        ax.fill_between(curve["k"], curve["lower"], curve["upper"], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right")
    settings = results["settings"]
    ax.set_title(title or f"pass@k, {settings['num_prompts']} prompts x n={settings['n_samples']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_eval(results: dict, output_dir: str, *, plot_name: str = "pass_at_k.png", title: str | None = None,
               verbose: bool = True) -> dict:
    """Writes `eval.json` and the pass@k plot into `output_dir`, and prints the table.

    Returns:
      `{"json": path, "plot": path}`.
    """
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "eval.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    plot_path = plot_pass_at_k(results, os.path.join(output_dir, plot_name), title=title)
    if verbose:
        print(format_table(results))
    return {"json": json_path, "plot": plot_path}

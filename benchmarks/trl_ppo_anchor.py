"""The anchor for `ppo_iteration.py`: TRL 1.8.0's `trl.experimental.ppo.PPOTrainer`.

Builds random GPT-2 policy / reference / value / reward models of the given
shape with PyTorch, a word-level tokenizer of the given vocabulary, a data set
of random fixed-length prompts, and times whole PPO iterations (HF generate,
reference + value + reward forwards, GAE, epochs x minibatches of updates).
Phase times come from wrapping TRL's module-level `batch_generation` and
`forward` helpers; the iteration time from a `TrainerCallback.on_step_end`.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")


def word_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast` whose vocabulary is `vocab_size` words t0, t1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 2)}
    vocab["<pad>"] = vocab_size - 2
    vocab["<eos>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def time_trl_ppo(
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int,
    batch_size: int,
    prompt_length: int,
    response_length: int,
    ppo_epochs: int,
    num_minibatches: int,
    iterations: int,
    warmup: int = 1,
    device: str = "cpu",
    bf16: bool = False,
    seed: int = 0,
) -> dict:
    """Median seconds per TRL PPO iteration and its phases, after `warmup` iterations."""
    import numpy as np
    import torch
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(vocab_size)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(1024, prompt_length + response_length),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    policy = GPT2LMHeadModel(cfg)
    ref = GPT2LMHeadModel(cfg)
    ref.load_state_dict(policy.state_dict())
    value = GPT2ForSequenceClassification(cfg)
    reward = GPT2ForSequenceClassification(cfg)

    rng = np.random.default_rng(seed)
    n_rows = batch_size * (iterations + warmup)
    prompts = rng.integers(0, vocab_size - 2, size=(n_rows, prompt_length)).tolist()
    dataset = Dataset.from_dict({"input_ids": prompts})

    # iteration_cpu: CPU seconds of this process (all threads) per iteration, less
    # sensitive than wall time to other processes sharing the machine.
    times = {"iteration": [], "generate": [], "score": [], "update": [], "iteration_cpu": []}
    marks: dict[str, float] = {}

    orig_generation = trl_ppo.batch_generation
    orig_forward = trl_ppo.forward

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed_generation(*args, **kwargs):
        sync()
        marks["gen_start"] = time.perf_counter()
        marks["gen_start_cpu"] = time.process_time()
        out = orig_generation(*args, **kwargs)
        sync()
        marks["gen_end"] = time.perf_counter()
        marks.pop("update_start", None)
        return out

    def marking_forward(model, *args, **kwargs):
        # The first forward of the policy-and-value wrapper opens the update phase.
        if isinstance(model, trl_ppo.PolicyAndValueWrapper) and "update_start" not in marks:
            sync()
            marks["update_start"] = time.perf_counter()
        return orig_forward(model, *args, **kwargs)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            end = time.perf_counter()
            times["iteration"].append(end - marks["gen_start"])
            times["iteration_cpu"].append(time.process_time() - marks["gen_start_cpu"])
            times["generate"].append(marks["gen_end"] - marks["gen_start"])
            times["score"].append(marks["update_start"] - marks["gen_end"])
            times["update"].append(end - marks["update_start"])
            return control

    trl_ppo.batch_generation = timed_generation
    trl_ppo.forward = marking_forward
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            args = PPOConfig(
                output_dir=out_dir,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=1,
                local_rollout_forward_batch_size=batch_size,
                num_mini_batches=num_minibatches,
                num_ppo_epochs=ppo_epochs,
                response_length=response_length,
                total_episodes=n_rows,
                stop_token=None,
                temperature=0.7,
                learning_rate=1e-5,
                num_sample_generations=0,
                report_to=[],
                save_strategy="no",
                logging_steps=10**9,
                disable_tqdm=True,
                bf16=bf16,
                use_cpu=device == "cpu",
                seed=seed,
            )
            trainer = PPOTrainer(
                args=args,
                processing_class=tokenizer,
                model=policy,
                ref_model=ref,
                reward_model=reward,
                train_dataset=dataset,
                value_model=value,
                callbacks=[Timer()],
            )
            trainer.train()
    finally:
        trl_ppo.batch_generation = orig_generation
        trl_ppo.forward = orig_forward

    return {k: statistics.median(v[warmup:]) for k, v in times.items()} | {
        "iterations_timed": len(times["iteration"]) - warmup
    }


if __name__ == "__main__":
    import json

    print(json.dumps(time_trl_ppo(n_layer=4, n_embd=256, n_head=4, vocab_size=512, batch_size=64,
                                  prompt_length=16, response_length=32, ppo_epochs=4,
                                  num_minibatches=4, iterations=2)))

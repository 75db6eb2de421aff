"""The anchor for `grpo_iteration.py`: TRL 1.8.0's `trl.GRPOTrainer`.

Loads a GPT-2 policy from a `save_pretrained` folder (TRL builds its reference model
from the same path when `beta > 0`), uses a word-level tokenizer of the given
vocabulary (`trl_ppo_anchor.word_tokenizer`: prompt text "t3 t17 ..." is exactly
those ids), a data set of random fixed-length text prompts, a programmatic reward
on the completion token ids, and times whole GRPO iterations: one generation batch
(HF `generate` on `prompts x num_generations` rows), the old-policy and reference
log-probs and the rewards / group advantages, then `steps_per_generation` optimizer
steps on its slices.

Phases come from wrapping the trainer's `_generate` (generate) and
`_generate_and_score_completions` (generate + score) methods; an iteration ends at the
`on_step_end` of its last optimizer step.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")


def time_trl_grpo(
    *,
    model_dir: str,
    vocab_size: int,
    prompts: list[list[int]],
    prompts_per_iteration: int,
    group_size: int,
    response_length: int,
    num_minibatches: int,
    epochs: int,
    temperature: float,
    kl_coef: float,
    learning_rate: float,
    reward_fn,
    warmup: int = 1,
    device: str = "cpu",
    bf16: bool = False,
    seed: int = 0,
) -> dict:
    """Median seconds per TRL GRPO iteration and its phases, after `warmup` iterations.

    `prompts` holds `prompts_per_iteration x (warmup + timed)` rows of token ids;
    `reward_fn(completion_ids: list[list[int]]) -> list[float]`.
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl_ppo_anchor import word_tokenizer

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(vocab_size)
    iterations = len(prompts) // prompts_per_iteration
    dataset = Dataset.from_dict({"prompt": [" ".join(f"t{t}" for t in row) for row in prompts]})
    rows = prompts_per_iteration * group_size

    def reward(prompts, completions, completion_ids, **kwargs):
        del prompts, completions, kwargs
        return reward_fn(completion_ids)

    times = {"iteration": [], "generate": [], "score": [], "update": [], "iteration_cpu": []}
    marks: dict[str, float] = {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % (num_minibatches * epochs):
                return control
            sync()
            end = time.perf_counter()
            times["iteration"].append(end - marks["start"])
            times["iteration_cpu"].append(time.process_time() - marks["start_cpu"])
            times["generate"].append(marks["gen_end"] - marks["start"])
            times["score"].append(marks["scored"] - marks["gen_end"])
            times["update"].append(end - marks["scored"])
            return control

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            # one optimizer step = one minibatch of rows / num_minibatches completions
            per_device_train_batch_size=rows // num_minibatches,
            gradient_accumulation_steps=1,
            steps_per_generation=num_minibatches,  # generation batch = all rows of the iteration
            num_generations=group_size,
            num_iterations=epochs,
            max_completion_length=response_length,
            generation_kwargs={"min_new_tokens": response_length},  # exactly N tokens, as ours (no EOS)
            temperature=temperature,
            beta=kl_coef,
            loss_type="grpo",
            learning_rate=learning_rate,
            bf16=bf16,
            gradient_checkpointing=False,
            max_steps=iterations * num_minibatches * epochs,
            report_to=[],
            save_strategy="no",
            logging_steps=10**9,
            disable_tqdm=True,
            use_cpu=device == "cpu",
            seed=seed,
        )
        trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Timer()])

        generate, generate_and_score = trainer._generate, trainer._generate_and_score_completions

        def timed_generate(*a, **k):
            out = generate(*a, **k)
            sync()
            marks["gen_end"] = time.perf_counter()
            return out

        def timed_generate_and_score(*a, **k):
            sync()
            marks["start"] = time.perf_counter()
            marks["start_cpu"] = time.process_time()
            out = generate_and_score(*a, **k)
            sync()
            marks["scored"] = time.perf_counter()
            return out

        trainer._generate = timed_generate
        trainer._generate_and_score_completions = timed_generate_and_score
        trainer.train()

    out = {k: statistics.median(v[warmup:]) for k, v in times.items()}
    out["iterations_timed"] = len(times["iteration"]) - warmup
    return out

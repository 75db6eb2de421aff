"""The stand-in files that `configs/tiny/*.yaml` read: try the CLI offline in seconds.

    python -m rlhf_jax.demo.tiny_run            # writes ./tiny_run/
    rlhf-jax sft    --config configs/tiny/sft.yaml
    rlhf-jax reward --config configs/tiny/reward.yaml
    rlhf-jax dpo    --config configs/tiny/dpo.yaml
    rlhf-jax ppo    --config configs/tiny/ppo.yaml
    rlhf-jax eval   --config configs/tiny/eval.yaml
    rlhf-jax export --config configs/tiny/export.yaml

`make_tiny_run(root)` writes `root/tiny_run/` with a character tokenizer and
small JSONL files of one-digit additions in the TRL column conventions:
`sft.jsonl` (prompt/completion), `pairs.jsonl` and `pairs_eval.jsonl`
(prompt/chosen/rejected, the correct sum preferred) and `prompts.jsonl`
(prompt/answer). The models themselves are built by the configs (a random
2-layer GPT-2), so nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import random
import sys

from rlhf_jax.data.tokenizers import char_tokenizer

__all__ = ["make_tiny_run"]


def make_tiny_run(root: str = ".", *, seed: int = 0) -> str:
    """Write the tiny tokenizer and data files under `root/tiny_run`; returns that folder."""
    base = os.path.join(root, "tiny_run")
    os.makedirs(base, exist_ok=True)
    char_tokenizer().save_pretrained(os.path.join(base, "tokenizer"))
    rng = random.Random(seed)

    def sums(n):
        return [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]

    def dump(name, records):
        with open(os.path.join(base, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    dump("sft.jsonl", [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in sums(32)])
    dump("pairs.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + rng.randrange(5))}
                         for a, b in sums(32)])
    dump("pairs_eval.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                              for a, b in sums(8)])
    dump("prompts.jsonl", [{"prompt": f"{a}+{b}=", "answer": a + b} for a, b in sums(16)])
    return base


if __name__ == "__main__":
    print(make_tiny_run(sys.argv[1] if len(sys.argv) > 1 else "."))

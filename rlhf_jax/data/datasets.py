"""Data sets: JSONL / Parquet / HF `datasets` rows -> padded NumPy arrays for the drivers.

The column conventions are TRL's, so existing data sets work unchanged:

- SFT: `prompt` + `completion`, or `messages` (a conversation whose last
  turn is the assistant's answer);
- preferences (reward model): `prompt` + `chosen` + `rejected`, each a
  string or a list of `{role, content}` messages (optional float `margin`);
- RL prompts (PPO, evaluation): `prompt`, and optionally a reference
  `answer` that a verifier compares against.

Message lists go through `tokenizer.apply_chat_template`; a tokenizer
without a chat template meets them with a `DataError` naming the row (set one
with the CLI's `tokenizer.chat_template`, or `tokenizer.chat_template = ...`),
never with a made-up format. Completions always end with EOS (appended when
missing), and PAD must differ from EOS so a model can learn to stop (Huang et
al. 2024). The arrays follow DESIGN.md: SFT and preference sequences are
right-padded, RL prompts left-padded, each to the smallest bucket length that
fits the whole set, so every batch has one shape.

Every problem with a row (bad JSON, a missing column, a wrong type, an empty
prompt, a prompt longer than the limit) raises `DataError` naming the file and
the 1-based line (JSONL) or row (Parquet, HF). Reading lives in
`rlhf_jax.data.records` (re-exported here).

References:
  Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
  arXiv 2403.17031.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.data.padding import DEFAULT_BUCKETS, bucket_length, left_pad, right_pad
from rlhf_jax.data.records import DataError, Row, read_rows, read_sources

__all__ = [
    "DataError",
    "Row",
    "Examples",
    "read_rows",
    "read_sources",
    "special_token_ids",
    "sft_examples",
    "preference_examples",
    "prompt_examples",
]


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized examples.

    Attributes:
      arrays: the `[N, L]` arrays the drivers take (int32), plus `margin` [N]
        for preferences when every row has one.
      rows: where each example came from (`file, line N`), in order.
      prompts: the prompt texts as rendered (after any chat template).
      answers: RL only: the reference answers as strings (None where absent).
      dropped: rows skipped because they were too long (`too_long="drop"`).
    """

    arrays: dict
    rows: tuple
    prompts: tuple
    answers: tuple = ()
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- tokenization


def special_token_ids(tokenizer, *, pad_token: str | None = None) -> tuple[int, int]:
    """The `(pad_id, eos_id)` to use, checking that both exist and differ.

    Args:
      tokenizer: an HF tokenizer.
      pad_token: a token string (already in the vocabulary) to use as PAD
        instead of the tokenizer's own.

    Raises:
      DataError: no EOS, no PAD, or PAD == EOS (a model trained so cannot learn to stop).
    """
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; completions must end with EOS")
    if pad_token is not None:
        pad_id = tokenizer.convert_tokens_to_ids(pad_token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if pad_id is None or (pad_id == unk and pad_token != getattr(tokenizer, "unk_token", None)):
            raise DataError(f"`tokenizer.pad_token` {pad_token!r} is not in the tokenizer's vocabulary")
    else:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise DataError("the tokenizer has no PAD token; set `tokenizer.pad_token` to a token of its "
                        "vocabulary that differs from EOS")
    if pad_id == eos_id:
        raise DataError(f"the tokenizer's PAD and EOS are the same token (id {eos_id}); set "
                        "`tokenizer.pad_token` to another token of its vocabulary (PAD must differ from EOS "
                        "so the model learns to stop)")
    return int(pad_id), int(eos_id)


def _check_messages(row: Row, column: str, value) -> list[dict]:
    if not value:
        raise row.error(f"column `{column}` is an empty message list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise row.error(f"column `{column}`[{i}] must be an object with string `role` and `content`, "
                            f"got {m!r}")
    return value


def _get(row: Row, column: str, *, optional: bool = False):
    if not isinstance(row.data, dict):
        raise row.error(f"expected a JSON object, got {type(row.data).__name__}")
    if column not in row.data or row.data[column] is None:
        if optional:
            return None
        raise row.error(f"missing column `{column}` (columns: {', '.join(map(str, row.data)) or 'none'})")
    value = row.data[column]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(row, column, value)
    raise row.error(f"column `{column}` must be a string or a list of messages, got {type(value).__name__}")


class _Renderer:
    """Turns prompts and completions (strings or message lists) into token ids."""

    def __init__(self, tokenizer, *, eos_id: int, prompt_template: str | None = None):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.prompt_template = prompt_template
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def _need_template(self, row: Row):
        if not self.templated:
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise row.error(f"a message list, but the tokenizer ({name}) has no chat template to render it; set "
                            "`tokenizer.chat_template` (a Jinja template or a .jinja file), or give the rows as "
                            "strings")

    def prompt_text(self, row: Row, prompt) -> str:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise row.error("empty prompt")
            text = self.prompt_template.replace("{prompt}", prompt) if self.prompt_template else prompt
        else:
            self._need_template(row)
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if not text.strip():
            raise row.error("empty prompt")
        return text

    def completion_text(self, row: Row, column: str, prompt, prompt_text: str, completion) -> str:
        if isinstance(completion, str):
            if not isinstance(prompt, str):
                raise row.error(f"column `{column}` is a string but the prompt is a message list; give "
                                "both as strings or both as message lists")
            return completion
        if isinstance(prompt, str):
            raise row.error(f"column `{column}` is a message list but the prompt is a string; give both "
                            "as strings or both as message lists")
        self._need_template(row)
        full = self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
        if not full.startswith(prompt_text):
            raise row.error(f"the chat template of prompt + `{column}` does not extend the prompt's template "
                            "(cannot split off the completion)")
        # Templates often end a turn with its end token and a newline ("<|im_end|>\n"): drop the
        # trailing whitespace so the sequence ends on that token, which is EOS for chat models.
        return full[len(prompt_text):].rstrip()

    def prompt_ids(self, row: Row, text: str) -> list[int]:
        # A template already holds its special tokens; a plain prompt gets the tokenizer's
        # usual prefix (e.g. BOS for Llama), but never a trailing EOS.
        ids = list(self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"])
        while ids and ids[-1] == self.eos_id:
            ids.pop()
        if not ids:
            raise row.error("the prompt tokenizes to nothing")
        return ids

    def completion_ids(self, row: Row, column: str, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids and not text:
            raise row.error(f"column `{column}` is empty")
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids


def _fit(row: Row, prompt_ids, completion_ids, *, max_prompt_length, max_length, too_long):
    """Apply the length limits; None means drop the row."""
    if len(prompt_ids) > max_prompt_length:
        if too_long == "drop":
            return None
        raise row.error(f"the prompt has {len(prompt_ids)} tokens, more than data.max_prompt_length="
                        f"{max_prompt_length} (set data.too_long to drop to skip such rows)")
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return completion_ids
    if too_long == "drop":
        return None
    if too_long == "truncate":
        return completion_ids[:max_length - len(prompt_ids)]
    raise row.error(f"prompt + completion have {len(prompt_ids) + len(completion_ids)} tokens, more than "
                    f"data.max_length={max_length} (set data.too_long to truncate or drop)")


def _padded_length(lengths, buckets, what):
    try:
        return bucket_length(max(lengths), buckets)
    except ValueError:
        raise DataError(f"the longest {what} has {max(lengths)} tokens, more than the largest bucket "
                        f"{max(buckets)} (data.buckets)") from None


def _no_rows(rows, dropped):
    if not rows:
        raise DataError(f"no usable rows ({dropped} dropped as too long)")


def sft_examples(rows: Sequence[Row], tokenizer, *, prompt_column="prompt", completion_column="completion",
                 messages_column="messages", max_prompt_length=256, max_length=512, too_long="error",
                 buckets=DEFAULT_BUCKETS, pad_token=None,
                 prompt_template=None) -> Examples:
    """Tokenize SFT rows (`prompt` + `completion`, or `messages`) into right-padded arrays.

    Args:
      rows: records from `read_rows` / `read_sources`.
      tokenizer: an HF tokenizer with distinct PAD and EOS.
      prompt_column, completion_column, messages_column: column names.
      max_prompt_length: a longer prompt is a DataError.
      max_length: prompt + completion limit; `too_long` says what happens beyond
        it ("error", "truncate" the completion's end, or "drop" the row).
      buckets: allowed padded lengths.
      pad_token: PAD override (see `special_token_ids`).
      prompt_template: for string prompts, a text with `{prompt}` where the
        prompt goes (e.g. "Question: {prompt}\nAnswer:"); None keeps them as they are.

    Returns:
      `Examples` with arrays `input_ids`, `attention_mask`, `loss_mask`, all
      `[N, L]` int32; `loss_mask` is 1 on the completion tokens (EOS included).
    """
    pad_id, eos_id = special_token_ids(tokenizer, pad_token=pad_token)
    render = _Renderer(tokenizer, eos_id=eos_id,
                       prompt_template=prompt_template)
    sequences, masks, kept, prompts, dropped = [], [], [], [], 0
    for row in rows:
        if isinstance(row.data, dict) and messages_column in row.data and prompt_column not in row.data:
            messages = _get(row, messages_column)
            if isinstance(messages, str):
                raise row.error(f"column `{messages_column}` must be a list of messages, got a string")
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise row.error(f"column `{messages_column}` must end with an assistant turn after at least "
                                "one other turn")
            prompt, completion, column = messages[:-1], messages[-1:], messages_column
        else:
            prompt = _get(row, prompt_column)
            completion, column = _get(row, completion_column), completion_column
        text = render.prompt_text(row, prompt)
        prompt_ids = render.prompt_ids(row, text)
        completion_ids = render.completion_ids(
            row, column, render.completion_text(row, column, prompt, text, completion))
        completion_ids = _fit(row, prompt_ids, completion_ids, max_prompt_length=max_prompt_length,
                              max_length=max_length, too_long=too_long)
        if completion_ids is None:
            dropped += 1
            continue
        sequences.append(prompt_ids + completion_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(completion_ids))
        kept.append(row.where)
        prompts.append(text)
    _no_rows(kept, dropped)
    length = _padded_length([len(s) for s in sequences], buckets, "sequence")
    input_ids, attention_mask = right_pad(sequences, length, pad_id)
    loss_mask, _ = right_pad(masks, length, 0)
    arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    return Examples(arrays, tuple(kept), tuple(prompts), dropped=dropped)


def preference_examples(rows: Sequence[Row], tokenizer, *, prompt_column="prompt", chosen_column="chosen",
                        rejected_column="rejected", max_prompt_length=256, max_length=512, too_long="error",
                        buckets=DEFAULT_BUCKETS, pad_token=None,
                        prompt_template=None) -> Examples:
    """Tokenize preference rows (`prompt`, `chosen`, `rejected`) into right-padded pairs.

    Without a prompt column, `chosen` and `rejected` must be conversations
    that share everything but their last (assistant) turn (TRL's implicit
    prompt). Arguments as in `sft_examples`.

    Returns:
      `Examples` with arrays `chosen_ids`, `chosen_mask`, `rejected_ids`,
      `rejected_mask` (`[N, L]` int32, one L for both sides), `chosen_loss_mask`,
      `rejected_loss_mask` (`[N, L]` int32, 1 on the completion tokens: what DPO's
      sequence log-probs sum over) and `margin` `[N]` float32 when every row has a
      numeric `margin`.
    """
    pad_id, eos_id = special_token_ids(tokenizer, pad_token=pad_token)
    render = _Renderer(tokenizer, eos_id=eos_id,
                       prompt_template=prompt_template)
    chosen_seqs, rejected_seqs, margins, kept, prompts, dropped = [], [], [], [], [], 0
    chosen_masks, rejected_masks = [], []
    for row in rows:
        chosen, rejected = _get(row, chosen_column), _get(row, rejected_column)
        prompt = _get(row, prompt_column, optional=True)
        if prompt is None:
            if isinstance(chosen, str) or isinstance(rejected, str):
                raise row.error(f"missing column `{prompt_column}` (needed unless `{chosen_column}` and "
                                f"`{rejected_column}` are conversations)")
            if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
                raise row.error(f"without `{prompt_column}`, `{chosen_column}` and `{rejected_column}` must "
                                "share all turns but the last")
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        text = render.prompt_text(row, prompt)
        prompt_ids = render.prompt_ids(row, text)
        pair = []
        for column, completion in ((chosen_column, chosen), (rejected_column, rejected)):
            ids = render.completion_ids(row, column, render.completion_text(row, column, prompt, text, completion))
            pair.append(_fit(row, prompt_ids, ids, max_prompt_length=max_prompt_length, max_length=max_length,
                             too_long=too_long))
        if pair[0] is None or pair[1] is None:
            dropped += 1
            continue
        margin = row.data.get("margin")
        margins.append(float(margin) if isinstance(margin, (int, float)) and not isinstance(margin, bool)
                       else None)
        chosen_seqs.append(prompt_ids + pair[0])
        rejected_seqs.append(prompt_ids + pair[1])
        chosen_masks.append([0] * len(prompt_ids) + [1] * len(pair[0]))
        rejected_masks.append([0] * len(prompt_ids) + [1] * len(pair[1]))
        kept.append(row.where)
        prompts.append(text)
    _no_rows(kept, dropped)
    length = _padded_length([len(s) for s in chosen_seqs + rejected_seqs], buckets, "sequence")
    chosen_ids, chosen_mask = right_pad(chosen_seqs, length, pad_id)
    rejected_ids, rejected_mask = right_pad(rejected_seqs, length, pad_id)
    chosen_loss_mask, _ = right_pad(chosen_masks, length, 0)
    rejected_loss_mask, _ = right_pad(rejected_masks, length, 0)
    arrays = {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
              "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
              "chosen_loss_mask": chosen_loss_mask, "rejected_loss_mask": rejected_loss_mask}
    if all(m is not None for m in margins):
        arrays["margin"] = np.asarray(margins, np.float32)
    return Examples(arrays, tuple(kept), tuple(prompts), dropped=dropped)


def prompt_examples(rows: Sequence[Row], tokenizer, *, prompt_column="prompt", answer_column="answer",
                    max_prompt_length=256, buckets=DEFAULT_BUCKETS,
                    pad_token=None, prompt_template=None, too_long="error") -> Examples:
    """Tokenize RL prompts into left-padded arrays, keeping the reference answers.

    Args:
      rows: records with a `prompt` (string or messages) and an optional `answer`.
      tokenizer, max_prompt_length, buckets, pad_token, prompt_template:
        as in `sft_examples`.
      too_long: "drop" skips prompts longer than `max_prompt_length`; otherwise
        they are an error.
      prompt_column, answer_column: column names.

    Returns:
      `Examples` with arrays `prompt_ids`, `prompt_mask` (`[N, P]` int32, left-padded)
      and `answers` (strings, None where a row has none).
    """
    pad_id, eos_id = special_token_ids(tokenizer, pad_token=pad_token)
    render = _Renderer(tokenizer, eos_id=eos_id,
                       prompt_template=prompt_template)
    sequences, kept, prompts, answers, dropped = [], [], [], [], 0
    for row in rows:
        text = render.prompt_text(row, _get(row, prompt_column))
        ids = render.prompt_ids(row, text)
        if len(ids) > max_prompt_length:
            if too_long == "drop":
                dropped += 1
                continue
            raise row.error(f"the prompt has {len(ids)} tokens, more than data.max_prompt_length="
                            f"{max_prompt_length} (set data.too_long to drop to skip such rows)")
        answer = row.data.get(answer_column)
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise row.error(f"column `{answer_column}` must be a string or a number, got {type(answer).__name__}")
        sequences.append(ids)
        kept.append(row.where)
        prompts.append(text)
        answers.append(None if answer is None else str(answer))
    _no_rows(kept, dropped)
    length = _padded_length([len(s) for s in sequences], buckets, "prompt")
    prompt_ids, prompt_mask = left_pad(sequences, length, pad_id)
    return Examples({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, tuple(kept), tuple(prompts),
                    answers=tuple(answers), dropped=dropped)

"""A character-level tokenizer that is a real Hugging Face fast tokenizer.

The offline demo trains tiny models from scratch, so it needs a tokenizer
that exists without a download. `char_tokenizer` builds one with the
`tokenizers` library: a `WordLevel` model whose "words" are single
characters (a pre-tokenizer isolates every character, a `Fuse` decoder joins
them back), wrapped in `transformers.PreTrainedTokenizerFast`. Because it is
an ordinary fast tokenizer it saves with `save_pretrained`, reloads with
`AutoTokenizer.from_pretrained` offline, and an exported demo model works
in `transformers` with it.

Special tokens come first and are distinct (Huang et al. 2024: PAD is not
EOS, so a model learns to stop): `<pad>` = 0, `<eos>` = 1, `<bos>` = 2,
`<unk>` = 3; the alphabet follows in the order given.

References:
  Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
  arXiv 2403.17031.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "DEMO_ALPHABET",
    "SPECIAL_TOKENS",
    "char_tokenizer",
    "encode_texts",
    "decode_tokens",
]

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)

# Digits and arithmetic signs for the addition task, lower-case letters and a
# little punctuation for the preference task: 4 specials + 44 characters.
DEMO_ALPHABET = "0123456789+-=*abcdefghijklmnopqrstuvwxyz ,.!?"


def char_tokenizer(alphabet: str = DEMO_ALPHABET) -> PreTrainedTokenizerFast:
    """Builds a character-level fast tokenizer over `alphabet`.

    Every character of `alphabet` is one token; ids 0-3 are `<pad>`,
    `<eos>`, `<bos>`, `<unk>`. Encoding adds no special tokens (prompts and
    completions are assembled by the caller); a character outside the
    alphabet maps to `<unk>`.

    Args:
      alphabet: the characters, without repeats; whitespace is allowed.

    Returns:
      A `PreTrainedTokenizerFast` with `pad_token_id` 0, `eos_token_id` 1,
      `bos_token_id` 2, `unk_token_id` 3, and `len(tokenizer)` equal to
      `4 + len(alphabet)`.

    Raises:
      ValueError: `alphabet` is empty or repeats a character.

    >>> tok = char_tokenizer("0123456789+=")
    >>> tok("12+3=").input_ids
    [5, 6, 14, 7, 15]
    >>> tok.decode([5, 6, 1, 0], skip_special_tokens=True)
    '12'
    """
    if not alphabet:
        raise ValueError("`alphabet` must contain at least one character")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"`alphabet` repeats the characters {repeated!r}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(alphabet))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # `[\s\S]` matches any one character, newlines included.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Encodes strings to lists of ids, adding no special tokens.

    Args:
      tokenizer: any HF tokenizer (usually `char_tokenizer()`).
      texts: the strings.

    Returns:
      One list of ids per string.
    """
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def decode_tokens(tokenizer, tokens, mask=None) -> list[str]:
    """Decodes a `[B, N]` array of response tokens to strings.

    Special tokens (EOS, PAD) are dropped, and so is every position where
    `mask` is 0, so a sampler's right-padded output decodes to exactly the
    text that was generated.

    Args:
      tokenizer: the tokenizer the tokens came from.
      tokens: `[B, N]` integer ids.
      mask: optional `[B, N]`, 1 at the positions to keep.

    Returns:
      B strings.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"`tokens` must be [B, N], got shape {tokens.shape}")
    if mask is None:
        rows = [row.tolist() for row in tokens]
    else:
        mask = np.asarray(mask)
        if mask.shape != tokens.shape:
            raise ValueError(f"`mask` shape {mask.shape} differs from `tokens` shape {tokens.shape}")
        rows = [row[m > 0].tolist() for row, m in zip(tokens, mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)

"""Tests for the character-level tokenizer (rlhf_jax.data.tokenizers)."""
import doctest

import numpy as np
import pytest
from transformers import AutoTokenizer

from rlhf_jax.data import tokenizers as tok_mod
from rlhf_jax.data.tokenizers import DEMO_ALPHABET, char_tokenizer, decode_tokens, encode_texts


def test_special_tokens_are_distinct_and_first():
    tok = char_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(DEMO_ALPHABET)
    assert len(tok) <= 128


def test_every_character_is_one_token_and_round_trips():
    tok = char_tokenizer()
    text = "the sea is calm, 37+45=82!"
    ids = encode_texts(tok, [text])[0]
    assert len(ids) == len(text)
    assert ids == [4 + DEMO_ALPHABET.index(c) for c in text]
    assert tok.decode(ids) == text


def test_unknown_character_maps_to_unk():
    tok = char_tokenizer("ab")
    assert encode_texts(tok, ["aXb"])[0] == [4, tok.unk_token_id, 5]


def test_repeated_or_empty_alphabet_is_an_error():
    with pytest.raises(ValueError, match="repeats"):
        char_tokenizer("abca")
    with pytest.raises(ValueError, match="at least one"):
        char_tokenizer("")


def test_decode_tokens_drops_specials_and_masked_positions():
    tok = char_tokenizer("0123456789")
    tokens = np.array([[5, 6, 1, 0], [7, 8, 9, 4]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert decode_tokens(tok, tokens, mask) == ["12", "34"]
    assert decode_tokens(tok, tokens) == ["12", "3450"]
    with pytest.raises(ValueError):
        decode_tokens(tok, tokens, mask[:, :2])


def test_save_and_reload_offline_with_auto_tokenizer(tmp_path):
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+30= the cat is warm."
    assert again(text, add_special_tokens=False).input_ids == encode_texts(tok, [text])[0]
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (0, 1, 2)
    assert again.decode(encode_texts(tok, [text])[0] + [1, 0], skip_special_tokens=True) == text


def test_doctests():
    failures, _ = doctest.testmod(tok_mod)
    assert failures == 0

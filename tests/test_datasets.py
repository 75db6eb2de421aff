"""Tests of rlhf_jax.data.datasets: reading files, TRL columns, padding, and row errors."""
import json

import numpy as np
import pytest

from rlhf_jax.data.datasets import (
    DataError,
    preference_examples,
    prompt_examples,
    read_rows,
    read_sources,
    sft_examples,
    special_token_ids,
)
from rlhf_jax.data.tokenizers import char_tokenizer

BUCKETS = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sft_prompt_completion_right_padded_with_eos_and_loss_mask(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+2=", "completion": "3"},
                                                {"prompt": "10+20=", "completion": "30"}])
    ex = sft_examples(read_rows(path), tok, max_prompt_length=8, max_length=16, buckets=BUCKETS)
    ids, attn, loss = (ex.arrays[k] for k in ("input_ids", "attention_mask", "loss_mask"))
    assert ids.shape == (2, 16) and ids.dtype == np.int32  # longest: 6 + 2 + EOS = 9 tokens -> bucket 16
    expected0 = encode(tok, "1+2=") + encode(tok, "3") + [tok.eos_token_id]
    assert ids[0, :len(expected0)].tolist() == expected0
    assert attn[0].tolist() == [1] * len(expected0) + [0] * (16 - len(expected0))
    assert loss[0].tolist() == [0, 0, 0, 0, 1, 1] + [0] * 10
    assert ids[0, len(expected0):].tolist() == [tok.pad_token_id] * (16 - len(expected0))
    assert ex.rows == (f"{path}, line 1", f"{path}, line 2")


def test_sft_length_goes_to_the_next_bucket(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "123+456=", "completion": "579"}])
    ex = sft_examples(read_rows(path), tok, max_prompt_length=8, max_length=16, buckets=BUCKETS)
    assert ex.arrays["input_ids"].shape == (1, 16)  # 8 + 3 + EOS = 12 tokens
    assert ex.arrays["loss_mask"][0].sum() == 4


def test_sft_messages_with_chat_template(tmp_path, tok):
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}={{ m['content'] }}.{% endfor %}"
                         "{% if add_generation_prompt %}a={% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "yo"}]}])
    ex = sft_examples(read_rows(path), tok, max_prompt_length=16, max_length=32, buckets=BUCKETS)
    # prompt "u=hi.a=", completion = full[len(prompt):] = "yo." + EOS
    assert ex.prompts == ("u=hi.a=",)
    row = ex.arrays["input_ids"][0]
    n = int(ex.arrays["attention_mask"][0].sum())
    assert tok.decode(row[:n], skip_special_tokens=True) == "u=hi.a=yo."
    assert row[n - 1] == tok.eos_token_id
    assert ex.arrays["loss_mask"][0].sum() == 4


def test_messages_without_a_chat_template_are_an_error_naming_the_row(tmp_path, tok):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "x", "completion": "y"}, {"messages": turns}])
    assert not getattr(tok, "chat_template", None)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2: a message list, but the tokenizer .* has no chat "
                                        r"template .*`tokenizer.chat_template`"):
        sft_examples(read_rows(path), tok, max_prompt_length=32, max_length=64, buckets=BUCKETS)
    prompts = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": turns[:1]}])
    with pytest.raises(DataError, match=r"rl\.jsonl, line 1: a message list"):
        prompt_examples(read_rows(prompts), tok, max_prompt_length=32, buckets=BUCKETS)


def test_preferences_share_one_length_and_end_with_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "ab", "chosen": "c", "rejected": "dddddddddd", "margin": 1.5},
        {"prompt": "x", "chosen": "yy", "rejected": "z", "margin": 0},
    ])
    ex = preference_examples(read_rows(path), tok, max_prompt_length=8, max_length=16, buckets=BUCKETS)
    a = ex.arrays
    assert a["chosen_ids"].shape == a["rejected_ids"].shape == (2, 16)
    for ids, mask in ((a["chosen_ids"], a["chosen_mask"]), (a["rejected_ids"], a["rejected_mask"])):
        last = mask.sum(1) - 1
        assert (ids[np.arange(2), last] == tok.eos_token_id).all()
    np.testing.assert_allclose(a["margin"], [1.5, 0.0])


def test_preferences_implicit_prompt_from_conversations(tmp_path, tok):
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    user = {"role": "user", "content": "q"}
    path = write_jsonl(tmp_path / "pref.jsonl", [{"chosen": [user, {"role": "assistant", "content": "good"}],
                                                  "rejected": [user, {"role": "assistant", "content": "bad"}]}])
    ex = preference_examples(read_rows(path), tok, max_prompt_length=32, max_length=64, buckets=BUCKETS)
    assert ex.prompts == ("user: q\nassistant: ",)
    assert "margin" not in ex.arrays
    chosen = ex.arrays["chosen_ids"][0][ex.arrays["chosen_mask"][0] > 0]
    assert tok.decode(chosen[len("user: q\nassistant: "):-1]) == "good"


def test_prompts_left_padded_with_answers(tmp_path, tok):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "1+1=", "answer": 2}, {"prompt": "10+10="}])
    ex = prompt_examples(read_rows(path), tok, max_prompt_length=8, buckets=BUCKETS)
    ids, mask = ex.arrays["prompt_ids"], ex.arrays["prompt_mask"]
    assert ids.shape == (2, 8)
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ids[0, 4:].tolist() == encode(tok, "1+1=")
    assert ex.answers == ("2", None)


def test_parquet_rows_are_numbered(tmp_path, tok):
    import pyarrow as pa  # a test extra: missing is a failure, not a skip
    import pyarrow.parquet as pq
    path = str(tmp_path / "rl.parquet")
    pq.write_table(pa.table({"prompt": ["1+1=", ""], "answer": ["2", "0"]}), path)
    rows = read_rows(path)
    assert [r.number for r in rows] == [1, 2]
    with pytest.raises(DataError, match=r"rl\.parquet, row 2: empty prompt"):
        prompt_examples(rows, tok, max_prompt_length=8, buckets=BUCKETS)


@pytest.mark.parametrize("record, message", [
    ("{not json", r"line 2: invalid JSON"),
    ({"prompt": "1+1="}, r"line 2: missing column `completion`"),
    ({"prompt": 5, "completion": "x"},
     r"line 2: column `prompt` must be a string or a list of messages, got int"),
    ({"prompt": "   ", "completion": "x"}, r"line 2: empty prompt"),
    ({"prompt": "123456789", "completion": "x"},
     r"line 2: the prompt has 9 tokens, more than data.max_prompt_length=8"),
    ({"prompt": "1", "completion": "x" * 20},
     r"line 2: prompt \+ completion have 22 tokens, more than data.max_length=16"),
    ([1, 2], r"line 2: expected a JSON object, got list"),
    ({"messages": [{"role": "user", "content": "hi"}]},
     r"line 2: column `messages` must end with an assistant turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     r"line 2: column `messages`\[0\] must be"),
])
def test_bad_sft_rows_name_file_and_line(tmp_path, tok, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2"}, record])
    with pytest.raises(DataError, match=r"bad\.jsonl, " + message):
        sft_examples(read_rows(path), tok, max_prompt_length=8, max_length=16, buckets=BUCKETS)


def test_blank_lines_keep_line_numbers(tmp_path, tok):
    path = tmp_path / "gap.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match=r"gap\.jsonl, line 3: missing column `completion`"):
        sft_examples(read_rows(str(path)), tok, max_prompt_length=8, max_length=16, buckets=BUCKETS)


def test_too_long_truncate_and_drop(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1", "completion": "x" * 20},
                                                 {"prompt": "1", "completion": "y"}])
    cut = sft_examples(read_rows(path), tok, max_prompt_length=8, max_length=16, too_long="truncate",
                       buckets=BUCKETS)
    assert cut.arrays["attention_mask"][0].sum() == 16 and len(cut) == 2
    dropped = sft_examples(read_rows(path), tok, max_prompt_length=8, max_length=16, too_long="drop",
                           buckets=BUCKETS)
    assert len(dropped) == 1 and dropped.dropped == 1 and dropped.rows[0].endswith("line 2")


def test_bad_preference_and_prompt_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"pref\.jsonl, line 1: missing column `rejected`"):
        preference_examples(read_rows(path), tok, max_prompt_length=8, max_length=16, buckets=BUCKETS)
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "a", "answer": [1]}])
    with pytest.raises(DataError, match=r"rl\.jsonl, line 1: column `answer` must be a string or a number"):
        prompt_examples(read_rows(path), tok, max_prompt_length=8, buckets=BUCKETS)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the data set is empty"):
        read_sources([str(tmp_path / "empty.jsonl")])


def test_pad_must_differ_from_eos(tok):
    tok = char_tokenizer()
    assert special_token_ids(tok) == (0, 1)
    tok.pad_token = tok.eos_token
    with pytest.raises(DataError, match=r"PAD and EOS are the same token \(id 1\).*tokenizer.pad_token"):
        special_token_ids(tok)
    assert special_token_ids(tok, pad_token="<unk>") == (3, 1)
    with pytest.raises(DataError, match=r"`tokenizer.pad_token` '<nope>' is not in the tokenizer's vocabulary"):
        special_token_ids(tok, pad_token="<nope>")


def test_prompt_template_and_dropping_long_prompts(tmp_path, tok):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "1+1", "answer": "2"}, {"prompt": "1" * 20, "answer": "1"}])
    ex = prompt_examples(read_rows(path), tok, max_prompt_length=8, buckets=BUCKETS, prompt_template="q{prompt}=",
                         too_long="drop")
    assert ex.prompts == ("q1+1=",) and ex.dropped == 1 and ex.answers == ("2",)
    with pytest.raises(DataError, match=r"rl\.jsonl, line 2: the prompt has 20 tokens"):
        prompt_examples(read_rows(path), tok, max_prompt_length=8, buckets=BUCKETS)


def test_rl_prompts_as_messages_use_the_chat_template(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}={{ m['content'] }}.{% endfor %}"
                         "{% if add_generation_prompt %}a={% endif %}")
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": [{"role": "user", "content": "2+2"}], "answer": "4"}])
    ex = prompt_examples(read_rows(path), tok, max_prompt_length=16, buckets=BUCKETS)
    assert ex.prompts == ("u=2+2.a=",)
    n = int(ex.arrays["prompt_mask"][0].sum())
    assert tok.decode(ex.arrays["prompt_ids"][0, -n:]) == "u=2+2.a="


def test_chat_template_turn_end_token_is_not_doubled(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}={{ m['content'] }}<eos>\n{% endfor %}"
                         "{% if add_generation_prompt %}a={% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "yo"}]}])
    ex = sft_examples(read_rows(path), tok, max_prompt_length=16, max_length=32, buckets=BUCKETS)
    n = int(ex.arrays["attention_mask"][0].sum())
    ids = ex.arrays["input_ids"][0, :n].tolist()
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # "yo<eos>", no "\n<eos>"
    assert tok.decode(ids[-3:-1]) == "yo"

from __future__ import annotations

import pytest

from depthlens.chat import build_chat, length_batches, pad_batch, render_prompt


def test_spans_are_exact(tiny):
    tok = tiny.tokenizer
    segs = ["Sure, here is how", " to bake bread:", " Step 1"]
    seq = build_chat(tok, "How do I bake bread?", segs)
    assert tok.decode(list(seq.ids[: seq.prompt_len])) == render_prompt(tok, "How do I bake bread?")
    for text, (a, b) in zip(segs, seq.segments):
        assert tok.decode(list(seq.ids[a:b])) == text
    assert seq.segments[0][0] == seq.prompt_len and seq.segments[-1][1] == len(seq.ids)


def test_token_id_segments_are_kept_verbatim(tiny):
    ids = tiny.tokenizer("the quick fox", add_special_tokens=False)["input_ids"]
    seq = build_chat(tiny.tokenizer, "hi", [ids[:2], "x", ids[2:]])
    a, b = seq.segments[0]
    assert list(seq.ids[a:b]) == ids[:2]
    a, b = seq.segments[2]
    assert list(seq.ids[a:b]) == ids[2:]


def test_prompt_ends_with_assistant_header(tiny):
    text = render_prompt(tiny.tokenizer, "hello")
    assert text.endswith("<|im_start|>assistant\n")


def test_pad_batch_left():
    b = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.offsets == (0, 2)


def test_length_batches_cover_all_once():
    batches = length_batches([5, 1, 3, 9, 2], 2)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == [0, 1, 2, 3, 4] and batches[0] == [1, 4]


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_prompt_is_rejected(tiny, bad):
    with pytest.raises(ValueError, match="non-empty string"):
        build_chat(tiny.tokenizer, bad)

"""The shared encoding: label positions, header, truncation, hashes."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from pact.core.data import Example, content_hash
from pact.core.encoding import (
    HEADER_FALLBACK,
    IGNORE_INDEX,
    EncodingOptions,
    assistant_header_ids,
    assistant_header_text,
    encode_example,
    encoding_fingerprints,
    hash_ids,
    post_only_ids,
    render,
    tokenize,
)
from pact.core.errors import PactError


def example(messages, response, example_id="e1"):
    return Example(example_id, tuple(messages), response, content_hash(messages, response), 1)


def test_labels_are_exactly_the_response_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = example([{"role": "user", "content": "hello there"}], "Sure, here is")
    enc = encode_example(tok, ex, EncodingOptions(max_length=128))
    prompt_ids = tokenize(tok, "<s><|user|>hello there<|end|><|assistant|>")
    assert enc.response_start == len(prompt_ids)
    assert enc.input_ids[: enc.response_start].tolist() == prompt_ids
    labelled = np.flatnonzero(enc.labels != IGNORE_INDEX)
    assert labelled.tolist() == list(range(enc.response_start, len(enc.input_ids)))
    assert tok.decode(enc.response_ids) == "Sure, here is<|end|>"
    assert enc.labels[labelled].tolist() == enc.input_ids[labelled].tolist()
    assert enc.response_length == len(enc.input_ids) - enc.response_start


def test_multiturn_only_last_assistant_turn_is_labelled(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    enc = encode_example(tok, example(messages, "ok"), EncodingOptions(max_length=128))
    text = tok.decode(enc.input_ids)
    assert text == "<s><|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|user|>bye<|end|><|assistant|>ok<|end|>"
    assert tok.decode(enc.input_ids[enc.labels != IGNORE_INDEX]) == "ok<|end|>"


def test_truncation_cuts_response_tail_and_is_recorded(tiny_tokenizer):
    ex = example([{"role": "user", "content": "hi"}], "the quick brown fox jumps over the lazy dog")
    full = encode_example(tiny_tokenizer, ex, EncodingOptions(max_length=512))
    limit = full.response_start + 3
    cut = encode_example(tiny_tokenizer, ex, EncodingOptions(max_length=limit))
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == limit
    assert cut.response_ids.tolist() == full.response_ids[:3].tolist()
    assert cut.token_hash != full.token_hash


def test_prompt_too_long_is_an_error(tiny_tokenizer):
    ex = example([{"role": "user", "content": "a long prompt " * 20}], "ok")
    with pytest.raises(PactError, match="leaving no room for the response within max_length 10"):
        encode_example(tiny_tokenizer, ex, EncodingOptions(max_length=10))


def test_hashes_depend_on_ids_only(tiny_tokenizer):
    a = encode_example(tiny_tokenizer, example([{"role": "user", "content": "x"}], "y", "a"), EncodingOptions(64))
    b = encode_example(tiny_tokenizer, example([{"role": "user", "content": "x"}], "y", "b"), EncodingOptions(64))
    c = encode_example(tiny_tokenizer, example([{"role": "user", "content": "z"}], "y", "c"), EncodingOptions(64))
    assert a.token_hash == b.token_hash == hash_ids(a.input_ids)
    assert a.token_hash != c.token_hash
    assert a.response_hash == c.response_hash == hash_ids(a.response_ids)


def test_header_is_generation_prompt_diff(tiny_tokenizer):
    assert assistant_header_text(tiny_tokenizer) == "<|assistant|>"
    assert assistant_header_ids(tiny_tokenizer) == tokenize(tiny_tokenizer, "<|assistant|>")


def test_fallback_template_and_header(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    assert assistant_header_text(tok) == HEADER_FALLBACK
    assert render(tok, [{"role": "user", "content": "hi"}], True) == "<s>User: hi\n\nAssistant:"
    enc = encode_example(tok, example([{"role": "user", "content": "hi"}], "ok"), EncodingOptions(64))
    assert tok.decode(enc.response_ids) == " ok</s>"
    assert encoding_fingerprints(tok, EncodingOptions(64))["chat_template"] != encoding_fingerprints(
        tiny_tokenizer, EncodingOptions(64)
    )["chat_template"]


def test_blank_generation_prompt_falls_back(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}  {% endif %}"
    assert assistant_header_text(tok) == "Assistant:"


def test_template_whose_prompt_is_not_a_prefix_is_refused(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    with pytest.raises(PactError, match="not a prefix of the full conversation"):
        encode_example(tok, example([{"role": "user", "content": "hi"}], "ok"), EncodingOptions(64))


def test_post_only_ids_positions():
    ids, offset = post_only_ids([7, 8], np.array([1, 2, 3]))
    assert ids.tolist() == [7, 8, 1, 2]
    assert offset == 1  # step 0 is predicted at the header's last token


def test_bad_options():
    with pytest.raises(PactError, match="max_length must be at least 2"):
        EncodingOptions(max_length=1)
    with pytest.raises(PactError, match="unknown truncation policy"):
        EncodingOptions(truncation="left")

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
    end_of_turn_ids,
    hash_ids,
    post_only_ids,
    render,
    template_turn_end,
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


# A template that writes a newline after its end-of-turn token, as Qwen, Gemma and Phi-3 do.
NEWLINE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@pytest.fixture
def newline_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = NEWLINE_TEMPLATE
    return tok


def test_labels_stop_at_end_of_turn(newline_tokenizer):
    tok = newline_tokenizer
    ex = example([{"role": "user", "content": "hi"}], "Sure")
    enc = encode_example(tok, ex, EncodingOptions(64))
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok.decode(enc.response_ids) == "Sure<|end|>"
    assert enc.input_ids[-1] == end and enc.labels[-1] == end  # the "\n" after it is not even context
    assert enc.response_start + enc.response_length == len(enc.input_ids)
    old = encode_example(tok, ex, EncodingOptions(64, label_after_end_of_turn=True))
    assert tok.decode(old.response_ids) == "Sure<|end|>\n"
    assert old.input_ids[:-1].tolist() == enc.input_ids.tolist() and old.token_hash != enc.token_hash


def test_end_of_turn_rule_is_in_the_fingerprint(newline_tokenizer):
    new = encoding_fingerprints(newline_tokenizer, EncodingOptions(64))["encoding"]
    old = encoding_fingerprints(newline_tokenizer, EncodingOptions(64, label_after_end_of_turn=True))["encoding"]
    assert new["label_after_end_of_turn"] is False and old["label_after_end_of_turn"] is True


def test_a_record_without_the_rule_is_the_old_behaviour():
    assert EncodingOptions.from_record({"max_length": 64, "truncation": "response_tail"}).label_after_end_of_turn
    assert not EncodingOptions.from_record(EncodingOptions(64).to_dict()).label_after_end_of_turn


def test_stores_made_the_other_way_are_refused_in_one_line(newline_tokenizer):
    from pact.trainer.validate import check_encoding, encoding_options_for

    legacy = {"encoding": {"max_length": 64, "truncation": "response_tail"}}  # a store before the rule
    with pytest.raises(PactError, match=r"label the tokens after the end-of-turn token .* stale for this run") as err:
        encoding_options_for(legacy, None, 1024)
    assert "\n" not in str(err.value) and "--label-after-end-of-turn" in str(err.value)
    assert encoding_options_for(legacy, None, 1024, label_after_end_of_turn=True).label_after_end_of_turn
    made_new = {"encoding": EncodingOptions(64).to_dict()}
    with pytest.raises(PactError, match="stop at the end-of-turn token but --label-after-end-of-turn was given"):
        encoding_options_for(made_new, None, 1024, label_after_end_of_turn=True)

    entry = encoding_fingerprints(newline_tokenizer, EncodingOptions(64))
    check_encoding(entry, newline_tokenizer, EncodingOptions(64))
    with pytest.raises(PactError, match="stop at the end-of-turn token but --label-after-end-of-turn was given"):
        check_encoding(entry, newline_tokenizer, EncodingOptions(64, label_after_end_of_turn=True))
    legacy_entry = dict(entry, encoding={"max_length": 64, "truncation": "response_tail"})
    check_encoding(legacy_entry, newline_tokenizer, EncodingOptions(64, label_after_end_of_turn=True))
    with pytest.raises(PactError, match="label the tokens after the end-of-turn token"):
        check_encoding(legacy_entry, newline_tokenizer, EncodingOptions(64))


def test_generation_stops_where_the_labels_stop(newline_tokenizer):
    from pact.pipeline.generation import stop_token_ids

    class Model:
        generation_config = type("Config", (), {"eos_token_id": [6, 2]})()

    end = newline_tokenizer.convert_tokens_to_ids("<|end|>")
    assert template_turn_end(newline_tokenizer) == (end, tokenize(newline_tokenizer, "\n"))
    assert end_of_turn_ids(newline_tokenizer) == sorted({newline_tokenizer.eos_token_id, end})
    assert stop_token_ids(Model(), newline_tokenizer) == sorted({2, 6, end})


def test_turn_end_follows_a_changed_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert template_turn_end(tok) == (end, [])
    tok.chat_template = NEWLINE_TEMPLATE
    assert template_turn_end(tok) == (end, tokenize(tok, "\n"))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert template_turn_end(tok) is None

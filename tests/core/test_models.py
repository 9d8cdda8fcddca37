"""Model loading: the weight check tells a tied head from a missing one."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pact.core.errors import PactError
from pact.core.models import check_loading_info


def _model(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_a_head_tied_to_the_embeddings_is_not_missing(tmp_path) -> None:
    """Some loaders report the tied head `lm_head.weight` missing (it is stored once, as the
    embeddings); it shares their storage, so the model is complete."""
    model = _model(tied=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    check_loading_info(tmp_path, {"missing_keys": {"lm_head.weight"}}, model)


def test_an_untied_missing_head_is_refused(tmp_path) -> None:
    with pytest.raises(PactError, match=r"do not match its config\.json: 1 missing \(first: lm_head\.weight\)"):
        check_loading_info(tmp_path, {"missing_keys": {"lm_head.weight"}}, _model(tied=False))


def test_a_missing_embedding_is_refused_even_when_the_head_is_tied(tmp_path) -> None:
    """Both sides of the tie missing: nothing loaded them."""
    with pytest.raises(PactError, match=r"2 missing \(first: lm_head\.weight\)"):
        check_loading_info(tmp_path, {"missing_keys": {"lm_head.weight", "model.embed_tokens.weight"}}, _model(tied=True))


def test_loads_in_threads_run_one_at_a_time(tmp_path, monkeypatch) -> None:
    """transformers' from_pretrained swaps `PreTrainedModel.tie_weights` (and `init_weights`)
    for no-ops during a load and restores them after; two loads in threads (precompute's
    concurrent-shards test) interleaved the swaps and left them swapped, so every tied model
    built later in the process came out untied. `load_model` now loads one at a time."""
    import threading
    import time

    from transformers import AutoModelForCausalLM, PreTrainedModel

    from pact.core.models import load_model

    _model(tied=True).save_pretrained(tmp_path)
    real = AutoModelForCausalLM.from_pretrained.__func__
    inside, most = [0], [0]

    def counting(cls, *args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)  # long enough for the other thread to arrive
        try:
            return real(cls, *args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    tie_weights = PreTrainedModel.tie_weights
    threads = [threading.Thread(target=load_model, args=(tmp_path,), kwargs={"device": "cpu"}) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert PreTrainedModel.tie_weights is tie_weights
    model = _model(tied=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

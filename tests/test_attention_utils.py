"""Per-model attention switching (raylens.models.attention): one model switched, a second one in
the same process untouched, the previous implementation back even when the call raises, sdpa's
silent empty ``attentions`` never returned."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AttentionInterface,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from raylens.models.attention import (
    attention_implementation,
    attention_weights,
    custom_attention,
    eager_attention,
    eager_attention_function,
)


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification._from_config(cfg, attn_implementation="sdpa").eval()


IDS = torch.tensor([[3, 7, 11, 5, 9, 2]])


@pytest.mark.parametrize("make", [_llama, _bert])
def test_eager_switches_one_model_and_restores(make):
    model, other = make(0), make(1)
    assert attention_implementation(model) == "sdpa"
    # the trap this module exists for: sdpa returns no weights, silently
    assert model(input_ids=IDS, output_attentions=True).attentions in ((), None)
    with eager_attention(model):
        assert attention_implementation(model) == "eager"
        assert attention_implementation(other) == "sdpa"
        atts = model(input_ids=IDS, output_attentions=True).attentions
        assert len(atts) == 2 and atts[0].shape == (1, 4, 6, 6)
        torch.testing.assert_close(atts[0].sum(-1), torch.ones(1, 4, 6))
    assert attention_implementation(model) == "sdpa"
    _, atts = attention_weights(model, input_ids=IDS)
    assert len(atts) == 2 and attention_implementation(model) == "sdpa"


def test_restored_when_the_call_raises():
    model = _llama()
    with pytest.raises(ZeroDivisionError):
        with eager_attention(model):
            raise ZeroDivisionError
    assert attention_implementation(model) == "sdpa"

    def broken(*args, **kwargs):
        raise ValueError("inside attention")

    with pytest.raises(ValueError, match="inside attention"):
        with custom_attention(model, broken) as name:
            model(input_ids=IDS)
    assert attention_implementation(model) == "sdpa"
    assert name not in AttentionInterface._global_mapping


@pytest.mark.parametrize("make", [_llama, _bert])
def test_custom_function_scoped_to_one_model(make):
    model, other = make(0), make(1)
    with torch.no_grad():
        before, other_before = model(input_ids=IDS).logits, other(input_ids=IDS).logits
    calls = []

    def doubled_values(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        calls.append(tuple(query.shape))
        return eager_attention_function(module, query, key, 2 * value, attention_mask, scaling, dropout, **kwargs)

    def plain(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        return eager_attention_function(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    with torch.no_grad():
        with custom_attention(model, plain):  # the generic eager function reproduces the model
            torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=1e-5, atol=1e-5)
        with custom_attention(model, doubled_values) as name:
            assert attention_implementation(model) == name
            changed = model(input_ids=IDS).logits
            torch.testing.assert_close(other(input_ids=IDS).logits, other_before, rtol=0, atol=0)
        assert len(calls) == 2 and not torch.allclose(changed, before)
        assert attention_implementation(model) == "sdpa"
        torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=0, atol=0)


def test_custom_function_gets_the_causal_mask():
    """A custom name is registered for masks too: a decoder's custom function sees the causal mask
    (without it the decoder would attend to the future)."""
    model = _llama()
    seen = []

    def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        seen.append(attention_mask)
        return eager_attention_function(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    with torch.no_grad(), custom_attention(model, spy):
        model(input_ids=IDS)
    mask = seen[0]
    assert mask is not None and mask.shape[-2:] == (6, 6)
    assert torch.isinf(mask[0, 0, 0, 1]) or mask[0, 0, 0, 1] < -1e30
    assert mask[0, 0, 1, 0] == 0


def test_rejects_non_transformers_models():
    with pytest.raises(TypeError):
        with eager_attention(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError):
        with custom_attention(_llama(), "eager"):
            pass

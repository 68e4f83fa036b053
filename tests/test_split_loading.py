"""Extraction loads only what it needs: the embeddings and the blocks up to the split point, as
the bare model without its head. Activations equal the full model's at the split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylens.io.schemas import tensor_column_to_numpy
from raylens.models.loading import truncated_config
from raylens.models.split import GRANULARITIES, SplitModel, load_split_model
from tests.conftest import REVIEWS


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def truncated():
    return load_split_model("smollm2-135m", 10)


def test_truncated_activations_equal_full_model(smollm, truncated):
    full = SplitModel(smollm, 10)
    assert truncated.module_path == "layers.10" and full.module_path == "model.layers.10"
    assert len(truncated.model.layers) == 11 and truncated.loaded.task == "base"
    ids = list(range(len(REVIEWS)))
    for granularity in GRANULARITIES:
        a, issues_a = full.extract(REVIEWS, ids, granularity=granularity, batch_size=4, dtype="float32")
        b, issues_b = truncated.extract(REVIEWS, ids, granularity=granularity, batch_size=4, dtype="float32")
        assert issues_a == issues_b
        assert a.drop(["activation"]).equals(b.drop(["activation"])), granularity
        np.testing.assert_array_equal(tensor_column_to_numpy(a["activation"]),
                                      tensor_column_to_numpy(b["activation"]), err_msg=granularity)


def test_truncated_loads_less_than_half_mid_model(smollm, truncated):
    # SmolLM2 at layer 10 of 30 (its tied 28M-parameter embedding is a fifth of the model)
    assert _n_params(truncated.model) < _n_params(smollm.model) / 2


def test_llama_8b_shape_at_layer_16_loads_about_half():
    from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        full = _n_params(LlamaForCausalLM(cfg))
        part = _n_params(AutoModel.from_config(truncated_config(cfg, 17)))
    assert 7.9e9 < full < 8.1e9
    assert part / full < 0.55, part / full   # embeddings + 17 of 32 blocks, no lm_head
    with pytest.raises(ValueError, match="num_layers must be in"):
        truncated_config(cfg, 33)


def test_module_path_split_and_bad_split_point():
    assert load_split_model("smollm2-135m", "model.layers.3").module_path == "layers.3"
    assert load_split_model("smollm2-135m", "model.norm").module_path == "model.norm"  # outside the stack: full
    with pytest.raises(ValueError, match="out of range"):
        load_split_model("smollm2-135m", 99)


def test_float16_overflow_is_reported_and_kept_out_of_the_fit(smollm, tmp_path):
    """A bfloat16-range activation above 65,504 becomes inf as float16: the document gets an
    issue naming the fix, and the activation stream leaves those rows out and counts them."""
    from raylens.io.readers import ActivationStream
    from raylens.io.store import OutputStore

    split = SplitModel(smollm, 5)
    real_hidden = split.hidden

    def huge_first_doc(ids, mask):
        h = real_hidden(ids, mask).clone()
        h[0, :, 0] = 1e6  # the shortest document of the batch (sorted by length)
        return h

    split.hidden = huge_first_doc
    texts = ["Bad", "A long and thoughtful film about memory."]
    table, issues = split.extract(texts, [0, 1], granularity="token", batch_size=4)
    assert [i["doc_id"] for i in issues] == [0] and "65,504" in issues[0]["error"]
    assert "activation_dtype: float32" in issues[0]["error"]
    x = tensor_column_to_numpy(table["activation"])
    doc = table["doc_id"].to_numpy()
    assert np.isinf(x[doc == 0]).any() and np.isfinite(x[doc == 1]).all()
    store = OutputStore(str(tmp_path / "out"))
    store.write_shard("activations", "shard-00000", table)
    stream = ActivationStream(store, batch_rows=4)
    rows = torch.cat(list(stream))
    assert len(rows) == int((doc == 1).sum()) and torch.isfinite(rows).all()
    assert stream.n_nonfinite == int((doc == 0).sum())
    table32, issues32 = split.extract(texts, [0, 1], granularity="token", dtype="float32")
    assert issues32 == [] and np.isfinite(tensor_column_to_numpy(table32["activation"])).all()

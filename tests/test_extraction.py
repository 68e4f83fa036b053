"""Split-point activations on the real SmolLM2 model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylens.io.schemas import tensor_column_to_numpy
from raylens.models.split import SplitModel, resolve_split_point
from tests.conftest import REVIEWS

LAYER = 7


def _hook_activations(lm, text: str, layer: int) -> torch.Tensor:
    """Reference: a plain PyTorch forward hook on the layer, full forward, one text."""
    store = {}
    mod = lm.model.model.layers[layer]
    h = mod.register_forward_hook(lambda m, i, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            enc = lm.tokenizer(text, return_tensors="pt")
            lm.model(**enc)
    finally:
        h.remove()
    return store["h"][0]  # (n_tokens, d_model)


def test_activations_equal_forward_hook(smollm):
    split = SplitModel(smollm, LAYER)
    assert split.module_path == f"model.layers.{LAYER}"
    table, issues = split.extract(REVIEWS, list(range(len(REVIEWS))), granularity="token", batch_size=4,
                                  dtype="float16")
    acts = tensor_column_to_numpy(table["activation"])
    doc_ids = table["doc_id"].to_numpy()
    assert acts.dtype == np.float16 and acts.shape[1] == 576
    for d, text in enumerate(REVIEWS):
        ref = _hook_activations(smollm, text, LAYER).numpy()
        mine = acts[doc_ids == d].astype(np.float32)
        tok = table.filter(table["doc_id"].to_numpy() == d)["token_start"].to_numpy()
        assert mine.shape == (len(tok), 576)
        expect = ref[tok].astype(np.float16).astype(np.float32)
        # float16 storage: relative 1e-3 of each value, plus a small absolute floor
        np.testing.assert_allclose(mine, expect, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("granularity", ["token", "word", "sentence", "sample_mean", "cls"])
def test_batch_size_1_equals_batch_size_8(smollm, granularity):
    split = SplitModel(smollm, LAYER)
    ids = list(range(len(REVIEWS)))
    t1, _ = split.extract(REVIEWS, ids, granularity=granularity, batch_size=1, dtype="float32")
    t8, _ = split.extract(REVIEWS, ids, granularity=granularity, batch_size=8, dtype="float32")
    assert t1.drop(["activation"]).equals(t8.drop(["activation"]))
    a1, a8 = tensor_column_to_numpy(t1["activation"]), tensor_column_to_numpy(t8["activation"])
    scale = np.abs(a1).max()
    assert np.abs(a1 - a8).max() <= 1e-5 * scale, np.abs(a1 - a8).max()


def test_units_cover_the_text(smollm):
    split = SplitModel(smollm, LAYER)
    text = "I loved it. Isn't it great?"
    words, _ = split.extract([text], [0], granularity="word")
    assert words["text"].to_pylist() == ["I", "loved", "it", ".", "Isn't", "it", "great", "?"]
    sents, _ = split.extract([text], [0], granularity="sentence")
    assert sents["text"].to_pylist() == ["I loved it.", "Isn't it great?"]
    for t in (words, sents):
        for s, e, u in zip(t["char_start"].to_pylist(), t["char_end"].to_pylist(), t["text"].to_pylist()):
            assert text[s:e] == u


def test_empty_and_long_texts_are_recorded(smollm):
    split = SplitModel(smollm, LAYER)
    table, issues = split.extract(["", "   ", "word " * 500, "fine text"], [0, 1, 2, 3], max_tokens=32)
    assert set(table["doc_id"].to_pylist()) == {2, 3}
    by_doc = {i["doc_id"]: i["error"] for i in issues}
    assert "empty" in by_doc[0] and "empty" in by_doc[1] and "truncated" in by_doc[2]
    assert {i["doc_id"]: i["kind"] for i in issues} == {0: "empty", 1: "empty", 2: "truncated"}
    assert max(table.filter(table["doc_id"].to_numpy() == 2)["token_end"].to_pylist()) <= 32


def test_bad_split_point_is_named(smollm):
    with pytest.raises(ValueError, match="out of range.*30 layers"):
        resolve_split_point(smollm.model, 30)
    with pytest.raises(ValueError, match="model.layer.3"):
        resolve_split_point(smollm.model, "model.layer.3")


def test_exclude_first_tokens_drops_the_attention_sink(smollm):
    split = SplitModel(smollm, 15)
    full, _ = split.extract(REVIEWS[:3], [0, 1, 2], dtype="float32")
    cut, _ = split.extract(REVIEWS[:3], [0, 1, 2], dtype="float32", exclude_first_tokens=1)
    assert 0 in full["token_start"].to_pylist() and 0 not in cut["token_start"].to_pylist()
    assert full.num_rows - cut.num_rows == 3
    norms = np.linalg.norm(tensor_column_to_numpy(full["activation"]), axis=1)
    first = full["token_start"].to_numpy() == 0
    assert norms[first].min() > 10 * np.median(norms[~first])  # why it is excluded by default

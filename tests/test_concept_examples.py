"""One streaming pass over activation rows: top examples, a seeded reservoir of activating
rows sampled over activation quantiles, and runs of text where a concept does not fire
(raylens.concepts.interpret.scan_concepts / quantile_sample / non_activating_table).

Fast tests on a known code matrix checked against brute force, and one on real SmolLM2
activations with a real concept model (PCA), read from the job's Parquet shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylens.concepts.interpret import (
    SAMPLED_EXAMPLES_SCHEMA,
    non_activating_table,
    quantile_sample,
    scan_concepts,
    top_activating,
    top_examples_table,
)
from raylens.io.schemas import tensor_array


class _Codes:
    """A 'concept model' whose codes are the first ``nb_concepts`` activation dimensions."""

    def __init__(self, nb_concepts: int):
        self.nb_concepts = nb_concepts

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.nb_concepts]


def _table(z: np.ndarray, doc: np.ndarray, unit: np.ndarray) -> pa.Table:
    cs = unit * 5
    return pa.table({"doc_id": pa.array(doc, pa.int64()), "unit": pa.array(unit, pa.int32()),
                     "char_start": pa.array(cs, pa.int32()), "char_end": pa.array(cs + 4, pa.int32()),
                     "activation": tensor_array(z.astype(np.float32), "float32")})


@pytest.fixture(scope="module")
def synthetic():
    """40 documents of 3..30 units; 6 concepts with firing rates from 2% to 80%."""
    rng = np.random.default_rng(0)
    lens = rng.integers(3, 31, size=40)
    doc = np.repeat(np.arange(40), lens)
    unit = np.concatenate([np.arange(n) for n in lens])
    rates = np.array([0.02, 0.1, 0.3, 0.5, 0.8, 0.0])
    z = np.where(rng.random((len(doc), 6)) < rates, rng.gamma(2.0, 1.0, (len(doc), 6)), 0.0)
    z[:, 2] *= np.where(rng.random(len(doc)) < 0.3, -1, 1)  # a signed concept: <= 0 does not fire
    return _table(z, doc, unit), z, doc, unit


def _brute_quiet(z, doc, unit, min_chars):
    """Every maximal run of consecutive units of one document with z <= 0, per concept."""
    runs = set()
    cs, ce = unit * 5, unit * 5 + 4
    for c in range(z.shape[1]):
        i = 0
        while i < len(doc):
            if z[i, c] > 0:
                i += 1
                continue
            j = i
            while j + 1 < len(doc) and doc[j + 1] == doc[i] and unit[j + 1] == unit[j] + 1 and z[j + 1, c] <= 0:
                j += 1
            if ce[j] - cs[i] >= min_chars:
                runs.add((c, int(doc[i]), int(cs[i]), int(ce[j])))
            i = j + 1
    return runs


@pytest.mark.parametrize("batch_rows", [7, 64, 10_000])
def test_scan_matches_brute_force_at_any_batch_size(synthetic, batch_rows):
    table, z, doc, unit = synthetic
    model = _Codes(6)
    batches = table.to_batches(max_chunksize=batch_rows)
    out = scan_concepts(model, batches, k=5, n_pool=10_000, n_quiet=10_000, min_quiet_chars=12, seed=3)
    # top examples: exactly top_activating's
    best, freq, n = top_activating(model, table.to_batches(max_chunksize=batch_rows), k=5)
    for key in best:
        assert torch.equal(out["best"][key], best[key])
    assert torch.equal(out["frequency"], freq) and out["n_rows"] == n == len(doc)
    # a pool larger than the data holds every activating row (z > 0), each once, with its value
    pool = out["pool"]
    for c in range(6):
        got = pool["value"][:, c]
        rows = {(int(d), int(u)) for d, u, v in zip(pool["doc_id"][:, c], pool["unit"][:, c], got) if v > -np.inf}
        want = {(int(doc[i]), int(unit[i])) for i in np.flatnonzero(z[:, c] > 0)}
        assert rows == want
        assert np.isclose(np.sort(got[torch.isfinite(got)].numpy()), np.sort(z[z[:, c] > 0, c])).all()
    # every quiet run, none twice, none missing: across batch boundaries too
    q = out["quiet"]
    got = [(c, int(q["doc_id"][r, c]), int(q["char_start"][r, c]), int(q["char_end"][r, c]))
           for c in range(6) for r in range(q["doc_id"].shape[0]) if q["doc_id"][r, c] >= 0]
    assert len(got) == len(set(got))
    assert set(got) == _brute_quiet(z, doc, unit, 12)


def test_reservoirs_are_bounded_seeded_uniform_samples(synthetic):
    table, z, doc, unit = synthetic
    model = _Codes(6)

    def run(seed):
        return scan_concepts(model, table.to_batches(max_chunksize=50), k=3, n_pool=8, n_quiet=4,
                             min_quiet_chars=1, seed=seed)

    a, b, c = run(0), run(0), run(1)
    for key in a["pool"]:
        assert torch.equal(a["pool"][key], b["pool"][key])
    assert not torch.equal(a["pool"]["doc_id"], c["pool"]["doc_id"])
    assert a["pool"]["value"].shape == (8, 6) and a["quiet"]["doc_id"].shape == (4, 6)
    # every kept row activates; the never-firing concept 5 has an empty pool and quiet runs
    v = a["pool"]["value"]
    assert (v[:, :5] > 0).all() and torch.isinf(v[:, 5]).all()
    assert (a["quiet"]["doc_id"] >= 0).all()
    # uniform: over many seeds each activating row of the rare concept 0 is kept about equally often
    act = np.flatnonzero(z[:, 0] > 0)
    keys = [(int(doc[i]), int(unit[i])) for i in act]
    counts = dict.fromkeys(keys, 0)
    n_runs = 300
    for s in range(n_runs):
        p = scan_concepts(model, table.to_batches(max_chunksize=50), k=1, n_pool=3, seed=s)["pool"]
        for d, u in zip(p["doc_id"][:, 0].tolist(), p["unit"][:, 0].tolist()):
            counts[(d, u)] += 1
    expect = n_runs * 3 / len(keys)
    assert min(counts.values()) > 0.5 * expect and max(counts.values()) < 1.6 * expect, (expect, counts)


def test_quantile_sample_spreads_over_activation_bins(synthetic):
    table, z, doc, unit = synthetic
    scan = scan_concepts(_Codes(6), table.to_batches(), k=3, n_pool=200, seed=0)
    picked = quantile_sample(scan["pool"], n_quantiles=4, per_quantile=2, seed=0)
    assert picked["value"].shape == (8, 6)
    for c in (3, 4):  # frequent concepts: a full reservoir of 200 rows
        v = picked["value"][:, c].numpy()
        qs = picked["quantile"][:, c].numpy()
        assert (np.diff(v) <= 0).all()  # sorted by decreasing activation
        assert sorted(qs.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
        pool_v = np.sort(scan["pool"]["value"][:, c].numpy())
        edges = [pool_v[len(b) - 1] for b in np.array_split(np.arange(200), 4)]  # not used for exact check
        # each pick lies in its bin: below the first value of the next bin, above the last of the one before
        bins = np.array_split(pool_v, 4)
        for val, q in zip(v, qs):
            assert bins[q][0] <= val <= bins[q][-1], (val, q, edges)
    assert torch.isinf(picked["value"][:, 5]).all() and (picked["quantile"][:, 5] == -1).all()
    again = quantile_sample(scan["pool"], n_quantiles=4, per_quantile=2, seed=0)
    assert all(torch.equal(picked[k], again[k]) for k in picked)
    docs = {int(d): "x" * 400 for d in set(doc.tolist())}
    t = top_examples_table(picked, docs, context_chars=10)
    assert t.schema == SAMPLED_EXAMPLES_SCHEMA and t.num_rows == int(torch.isfinite(picked["value"]).sum())
    nt = non_activating_table(scan_concepts(_Codes(6), table.to_batches(), n_quiet=2, min_quiet_chars=1)["quiet"], docs)
    assert nt.num_rows == 12 and all(len(r["text"]) == r["char_end"] - r["char_start"] for r in nt.to_pylist())


@pytest.mark.slow
def test_real_activations_from_the_job_parquet(smollm, tmp_path):
    """SmolLM2 layer-15 token activations of 24 reviews written as job shards; a PCA concept
    model; every sampled example is the row it claims, every quiet run really is quiet."""
    from raylens.concepts.models import build_concept_model
    from raylens.data.corpora import iter_corpus
    from raylens.io.readers import ActivationStream
    from raylens.io.schemas import tensor_column_to_numpy
    from raylens.io.store import OutputStore
    from raylens.models.split import SplitModel

    torch.set_num_threads(1)
    texts = [t for tb in iter_corpus("movie-reviews", limit=24) for t in tb.column("text").to_pylist()]
    split = SplitModel(smollm, 15)
    store = OutputStore(str(tmp_path))
    for i in range(0, 24, 8):
        table, _ = split.extract(texts[i:i + 8], list(range(i, i + 8)), max_tokens=48, exclude_first_tokens=1)
        store.write_shard("activations", f"shard-{i // 8:05d}", table)
    model = build_concept_model("pca", nb_concepts=8, d_model=576).fit_stream(ActivationStream(store), progress=False)
    cols = ["doc_id", "unit", "char_start", "char_end", "activation"]
    scan = scan_concepts(model, store.iter_shard_batches("activations", columns=cols, batch_rows=100), k=5,
                         n_pool=64, n_quiet=10, min_quiet_chars=40, seed=0)
    picked = quantile_sample(scan["pool"], n_quantiles=4, per_quantile=2, seed=0)
    docs = dict(enumerate(texts))
    sampled = top_examples_table(picked, docs, context_chars=60).to_pylist()
    quiet = non_activating_table(scan["quiet"], docs).to_pylist()
    acts = pa.concat_tables([store.read_table(f"activations/{s}.parquet") for s in store.done_shards("activations")])
    z = model.encode(torch.from_numpy(tensor_column_to_numpy(acts["activation"]).astype(np.float32))).numpy()
    doc, unit = acts["doc_id"].to_numpy(), acts["unit"].to_numpy()
    cs, ce = acts["char_start"].to_numpy(), acts["char_end"].to_numpy()
    assert len(sampled) == 8 * 8
    for r in sampled:
        i = np.flatnonzero((doc == r["doc_id"]) & (unit == r["unit"]))[0]
        assert z[i, r["concept"]] == pytest.approx(r["activation"], rel=1e-4, abs=1e-5) and r["activation"] > 0
        assert r["context"][r["span_start"]:r["span_end"]] == r["text"] == texts[r["doc_id"]][cs[i]:ce[i]]
    assert quiet, "PCA codes are signed: there are runs where a component is <= 0"
    for r in quiet:
        inside = (doc == r["doc_id"]) & (cs >= r["char_start"]) & (ce <= r["char_end"])
        assert inside.any() and (z[inside, r["concept"]] <= 0).all()
        assert len(r["text"]) >= 40


@pytest.mark.slow
def test_classifier_cls_rows_carry_the_predicted_class(smollm):
    """A sequence classifier at granularity cls: each activation row holds the class the full
    model predicts (one forward gives both), and the same activation as the early-stopping
    split forward; other models and granularities leave the column null."""
    from raylens.models import load_model
    from raylens.io.schemas import tensor_column_to_numpy
    from raylens.models.split import SplitModel

    torch.set_num_threads(1)
    texts = ["A wonderful, moving film with a superb cast.", "Dull, badly acted and far too long.",
             "I expected more, but the ending was great.", "Worst sequel ever made.",
             "Fun for the whole family.", "The plot made no sense at all and I left early."]
    clf = load_model("minilm-movie-sentiment", device="cpu")
    split = SplitModel(clf, 3)
    table, _ = split.extract(texts, list(range(6)), granularity="cls", batch_size=4, dtype="float32")
    assert table.schema.field("predicted_class").type == pa.int32()
    with torch.no_grad():
        for t, pred, act in zip(texts, table["predicted_class"].to_pylist(),
                                tensor_column_to_numpy(table["activation"])):
            enc = clf.tokenizer(t, return_tensors="pt")
            assert pred == int(clf.model(**enc).logits.argmax(-1))
            ids, mask = split.pad(split.encode([t], 128))
            ref = split.hidden(ids, mask)[0, 0].float().numpy()  # the nnsight path, stopped after layer 3
            np.testing.assert_allclose(act, ref, rtol=1e-4, atol=1e-4)
    assert len(set(table["predicted_class"].to_pylist())) == 2  # both sentiments occur
    tok, _ = split.extract(texts[:2], [0, 1], granularity="token")
    assert tok["predicted_class"].null_count == tok.num_rows
    lm, _ = SplitModel(smollm, 3).extract(texts[:2], [0, 1], granularity="cls")
    assert lm["predicted_class"].null_count == lm.num_rows

"""The array-based extraction path (raylens/models/extraction.py) against a plain reference:
one document at a time through `SplitModel.encode` / `SplitModel.units`, each unit's rows summed
in a Python loop, the table built from Python lists. Same schema, rows, order, values bit for
bit, issues, sampling and windows, on the real SmolLM2 and MiniLM classifier."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylens.io.schemas import activation_array, activations_schema
from raylens.models.extraction import concat_ranges, unit_texts
from raylens.models.split import RowSampling, SplitModel
from tests.conftest import REVIEWS

TEXTS = REVIEWS[:6] + [
    "",  # empty
    "   ",  # blank
    "word " * 300,  # truncated
    "Café naïve — “quoted” 日本語 text. Émoji 😀 here!  Ok?",  # non-ASCII spans
    None,  # not a string: empty
    "Short.",
]
IDS = [(37 * i + 11) % 101 for i in range(len(TEXTS))]  # not in order: extraction sorts by doc_id


def reference(split: SplitModel, texts, doc_ids, *, granularity, batch_size, max_tokens, dtype,
              exclude_first_tokens=0, sampling=None) -> tuple[pa.Table, list[dict]]:
    """The table and issues, computed directly: per document its units (`SplitModel.units`),
    kept ones (`RowSampling.keep`), documents with rows forwarded in batches sorted by length,
    each unit's float32 rows summed in token order and divided by their count (a batch whose
    units are all one token copies them), cast once to ``dtype``."""
    texts = [t if isinstance(t, str) else "" for t in texts]
    order = sorted(range(len(texts)), key=lambda i: doc_ids[i])
    texts, ids = [texts[i] for i in order], [int(doc_ids[i]) for i in order]
    encoded = split.encode(texts, max_tokens)
    units = [split.units(t, e, granularity, exclude_first_tokens) if t.strip() else [] for t, e in zip(texts, encoded)]
    issues = []
    for d, t, e, u in zip(ids, texts, encoded, units):
        if not t.strip() or not u:
            issues.append({"doc_id": d, "stage": "extract", "kind": "empty", "error": "empty text: no tokens, skipped"})
        elif e.truncated:
            issues.append({"doc_id": d, "stage": "extract", "kind": "truncated",
                           "error": f"truncated to max_tokens={max_tokens}"})
    kept = [[(int(k), u[k]) for k in (range(len(u)) if sampling is None else sampling.keep(len(u), d))]
            for u, d in zip(units, ids)]
    predict = granularity == "cls" and split.loaded.task == "sequence_classification"
    todo = sorted([j for j in range(len(texts)) if kept[j]], key=lambda j: len(encoded[j].input_ids))
    pooled, predicted = {}, {}
    for b in range(0, len(todo), batch_size):
        batch = todo[b: b + batch_size]
        input_ids, mask = split.pad([encoded[j] for j in batch])
        h, pred = split.hidden_and_prediction(input_ids, mask) if predict else (split.hidden(input_ids, mask), None)
        one = all(len(u.tokens) == 1 for j in batch for _, u in kept[j])
        for r, j in enumerate(batch):
            predicted[j] = None if pred is None else int(pred[r])
            for k, u in kept[j]:
                v = torch.zeros(h.shape[-1]) if not one else h[r, u.tokens[0]].float()
                for t in u.tokens if not one else ():
                    v += h[r, t].float()
                pooled[(j, k)] = v if one else v / torch.full((1,), float(len(u.tokens)))
    rows = [(j, k, u) for j in range(len(texts)) for k, u in kept[j]]
    values = torch.stack([pooled[(j, k)] for j, k, _ in rows]) if rows else torch.zeros(0, split.d_model)
    values = values.to(getattr(torch, dtype))
    if dtype == "float16":
        over = torch.isinf(values.float()).sum(1)
        for j in sorted({j for (j, _, _), n in zip(rows, over.tolist()) if n}):
            n = int(sum(c for (jj, _, _), c in zip(rows, over.tolist()) if jj == j))
            issues.append({"doc_id": ids[j], "stage": "extract", "kind": "float16_overflow",
                           "error": f"{n} activation values beyond float16's range (|x| > 65,504) stored as inf; "
                                    "those rows are left out of the fit; use extraction.activation_dtype: float32"})
    cols = {"doc_id": [ids[j] for j, _, _ in rows], "unit": [k for _, k, _ in rows],
            "char_start": [u.char_start for *_, u in rows], "char_end": [u.char_end for *_, u in rows],
            "token_start": [min(u.tokens) for *_, u in rows], "token_end": [max(u.tokens) + 1 for *_, u in rows],
            "text": [texts[j][u.char_start: u.char_end] for j, _, u in rows],
            "predicted_class": [predicted[j] for j, _, _ in rows]}
    schema = activations_schema(split.d_model, dtype)
    arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name != "activation"]
    return pa.Table.from_arrays(arrays + [activation_array(values, dtype)], schema=schema), issues


def assert_same(got: tuple[pa.Table, list[dict]], want: tuple[pa.Table, list[dict]]) -> None:
    """Column by column, the activation column's bytes included, and the issues."""
    (table, issues), (ref, ref_issues) = got, want
    assert table.schema == ref.schema
    assert table.num_rows == ref.num_rows and table.num_rows > 0
    for name in ref.column_names:
        a, b = table.column(name).combine_chunks(), ref.column(name).combine_chunks()
        if name == "activation":
            a, b = a.storage, b.storage
        assert a.equals(b), name
    assert issues == ref_issues


@pytest.fixture(scope="module")
def classifier():
    from raylens.models import load_model

    return load_model("minilm-movie-sentiment")


CASES = [  # granularity, dtype, exclude_first_tokens, sampling, window_rows
    ("token", "float16", 1, None, None),
    ("token", "float32", 0, RowSampling(4, 0.8, seed=3), 100),
    ("word", "float16", 1, RowSampling(3, seed=5), None),
    ("sentence", "float32", 0, None, 100),
    ("sample_mean", "bfloat16", 1, None, None),
    ("cls", "float16", 0, None, 100),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c[:3]) + ("-sampled" if c[3] else ""))
def test_equals_the_reference_on_smollm2(smollm, case):
    granularity, dtype, exclude, sampling, window = case
    split = SplitModel(smollm, 3)
    kw = {"granularity": granularity, "batch_size": 3, "max_tokens": 48, "dtype": dtype,
          "exclude_first_tokens": exclude, "sampling": sampling}
    tables, issues = [], []
    for t, found in split.iter_extract(TEXTS, IDS, window_rows=window, **kw):
        tables.append(t)
        issues += found
    assert len(tables) == (1 if window is None else -(-len(TEXTS) // (window // 48)))
    got = pa.concat_tables(tables)
    assert {i["kind"] for i in issues} >= {"empty", "truncated"}
    if window is None:
        assert_same((got, issues), reference(split, TEXTS, IDS, **kw))
    else:  # windows: the reference over each window's documents
        order = sorted(range(len(TEXTS)), key=lambda i: IDS[i])
        per = window // 48
        parts = [reference(split, [TEXTS[i] for i in order[w: w + per]], [IDS[i] for i in order[w: w + per]], **kw)
                 for w in range(0, len(order), per)]
        assert_same((got, issues), (pa.concat_tables([p[0] for p in parts]), [i for p in parts for i in p[1]]))


@pytest.mark.parametrize("granularity", ["cls", "token", "word"])
def test_equals_the_reference_on_the_minilm_classifier(classifier, granularity):
    """An encoder with [CLS] / [SEP] special tokens; at granularity cls its predicted class."""
    split = SplitModel(classifier, 2 if granularity != "cls" else -1)
    kw = {"granularity": granularity, "batch_size": 4, "max_tokens": 40, "dtype": "float32",
          "exclude_first_tokens": 0, "sampling": RowSampling(5, seed=1) if granularity == "word" else None}
    got = split.extract(TEXTS, IDS, **kw)
    assert_same(got, reference(split, TEXTS, IDS, **kw))
    if granularity == "cls":
        assert got[0]["predicted_class"].null_count == 0


def test_unit_texts_equal_python_slices():
    texts = ["Café naïve — “quoted” 日本語. 😀!", "plain ascii", "", "Ünï 😀😀 x"]
    rng = np.random.default_rng(0)
    row_doc = np.sort(rng.integers(0, len(texts), 200))
    start = np.array([rng.integers(0, len(texts[d]) + 2) for d in row_doc])
    end = start + rng.integers(-1, 6, len(start))
    got = unit_texts(texts, row_doc, start, end)
    assert got.to_pylist() == [texts[d][max(s, 0):max(e, 0)] for d, s, e in zip(row_doc, start, end)]
    assert got.validate(full=True) is None
    assert concat_ranges(np.array([3, 0, 7]), np.array([5, 0, 9])).tolist() == [3, 4, 7, 8]


def test_float16_overflow_counts_equal_the_reference(smollm):
    """Values beyond float16's range: the same ``inf`` rows and per-document counts in the issues."""
    split = SplitModel(smollm, 3)
    real_hidden = split.hidden

    def huge_first_doc(ids, mask):
        h = real_hidden(ids, mask).clone()
        h[0, :, :3] = 1e6  # the shortest document of each batch
        return h

    split.hidden = huge_first_doc
    kw = {"granularity": "token", "batch_size": 3, "max_tokens": 48, "dtype": "float16"}
    got = split.extract(TEXTS, IDS, **kw)
    assert_same(got, reference(split, TEXTS, IDS, **kw))
    assert sum(i["kind"] == "float16_overflow" for i in got[1]) == -(-len([t for t in TEXTS if t and t.strip()]) // 3)


@pytest.mark.parametrize("granularity, dtype", [("token", "float32"), ("token", "float16"), ("word", "float32")])
def test_device_copies_equal_the_host_copies(smollm, monkeypatch, granularity, dtype):
    """The torch copies used off the CPU (GPU) write the same rows as numpy's on the CPU."""
    import raylens.models.extraction as extraction

    split = SplitModel(smollm, 3)
    kw = {"granularity": granularity, "batch_size": 3, "max_tokens": 48, "dtype": dtype, "exclude_first_tokens": 1}
    host = split.extract(TEXTS, IDS, **kw)
    monkeypatch.setattr(extraction, "host_rows", lambda t: None)
    assert_same(split.extract(TEXTS, IDS, **kw), host)

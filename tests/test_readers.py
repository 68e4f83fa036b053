"""The activation stream: held-out rows read from their own folder when the extraction wrote
one (and by the document hash otherwise), parallel readers that keep the order, and a shuffle
that permutes rows and depends only on (seed, epoch). Real Parquet shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raylens.io.readers import ActivationStream, heldout_mask
from raylens.io.schemas import tensor_array
from raylens.io.store import OutputStore

D = 8


def _table(doc: np.ndarray, rng: np.random.Generator) -> pa.Table:
    x = rng.normal(size=(len(doc), D)).astype(np.float32)
    x[:, 0] = doc  # the row's document, readable from the vector
    return pa.table({"doc_id": pa.array(doc, pa.int64()), "activation": tensor_array(x, "float32")})


def _docs(shard: int) -> np.ndarray:
    return np.repeat(np.arange(shard * 30, shard * 30 + 30), 7)  # 30 documents of 7 rows


def _rows(stream) -> np.ndarray:
    return torch.cat(list(stream)).numpy()


def test_heldout_folder_and_hash_fallback(tmp_path):
    rng = np.random.default_rng(0)
    old, new = OutputStore(str(tmp_path / "old")), OutputStore(str(tmp_path / "new"))
    for s in range(3):
        doc = _docs(s)
        held = heldout_mask(doc, 0.2)
        table = _table(doc, rng)
        old.write_shard("activations", f"shard-{s:05d}", table)  # older layout: every row in activations/
        new.write_table(f"activations_heldout/shard-{s:05d}.parquet", table.filter(pa.array(held)))
        new.write_shard("activations", f"shard-{s:05d}", table.filter(pa.array(~held)))
    # a held-out file whose shard has no marker is not committed: never read
    new.write_table("activations_heldout/shard-00009.parquet", _table(np.arange(5) + 900, rng))
    for split in ("train", "heldout", "all"):
        a = _rows(ActivationStream(old, split=split, heldout_fraction=0.2, batch_rows=50))
        b = _rows(ActivationStream(new, split=split, heldout_fraction=0.7, batch_rows=50))  # fraction unused
        key = lambda r: r[np.lexsort(r.T[::-1])]  # noqa: E731 (same rows, any order)
        assert len(a) == len(b) and np.array_equal(key(a), key(b)), split
    held_docs = set(_rows(ActivationStream(new, split="heldout"))[:, 0].astype(int))
    all_docs = np.arange(90)
    assert held_docs == set(all_docs[heldout_mask(all_docs, 0.2)])
    assert not held_docs & set(_rows(ActivationStream(new, split="train"))[:, 0].astype(int))


def test_parallel_readers_keep_the_order_and_the_shuffle_permutes(tmp_path):
    rng = np.random.default_rng(1)
    store = OutputStore(str(tmp_path / "out"))
    for s in range(4):
        table = _table(_docs(s), rng)
        store.write_shard("activations", f"shard-{s:05d}", table)
    import pyarrow.parquet as pq  # several row groups per shard
    for s in range(4):
        p = store.path("activations", f"shard-{s:05d}.parquet")
        pq.write_table(pq.read_table(p), p, row_group_size=40)
    one = _rows(ActivationStream(store, batch_rows=33, readers=1, prefetch=1))
    many = _rows(ActivationStream(store, batch_rows=33, readers=4, prefetch=3))
    assert np.array_equal(one, many) and len(one) == 4 * 210
    assert np.array_equal(one[:, 0], np.concatenate([_docs(s) for s in range(4)]))
    shuffled = [ActivationStream(store, batch_rows=33, shuffle_buffer=100, seed=5, readers=r) for r in (1, 4)]
    e0 = [_rows(s) for s in shuffled]
    assert np.array_equal(e0[0], e0[1])  # the order does not depend on the readers
    assert not np.array_equal(e0[0], one)
    assert np.array_equal(np.sort(e0[0], axis=0), np.sort(one, axis=0))  # a permutation
    e1 = _rows(shuffled[0])
    shuffled[1].set_epoch(1)
    assert np.array_equal(e1, _rows(shuffled[1])) and not np.array_equal(e1, e0[0])
    # within a block of 100 rows only: row i ends up among the rows of its block
    blocks = np.arange(len(one)) // 100
    assert all(set(e0[0][blocks == b][:, 0]) == set(one[blocks == b][:, 0]) for b in np.unique(blocks))

"""The activation stream: held-out rows read from their own folder when the extraction wrote
one (and by the document hash otherwise), parallel readers that keep the order, and a shuffle
that permutes rows and depends only on (seed, epoch). Real Parquet shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
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


_READ_CHILD = r"""
import json, sys
import numpy as np
import pyarrow as pa
from raylens.io.readers import ActivationStream
from raylens.io.schemas import activation_array, activations_schema
from raylens.io.store import OutputStore

out, d, window_rows, cap, readers, prefetch, n_shards, shuffle = sys.argv[1], *map(int, sys.argv[2:9])
store = OutputStore(out)
schema = pa.schema([activations_schema(d).field("doc_id"), activations_schema(d).field("activation")])
rng = np.random.default_rng(0)
n_rows = 0
for s in range(n_shards):  # shards of 32 MiB of float16, written in windows of window_rows
    w = store.shard_writer("activations", f"shard-{s:05d}", schema, row_group_bytes=cap)
    for start in range(0, 8192, window_rows):
        x = rng.standard_normal((min(window_rows, 8192 - start), d)).astype(np.float16)
        w.write(pa.Table.from_arrays([pa.array(np.full(len(x), s), pa.int64()), activation_array(x)], schema=schema))
    store.commit_shard("activations", f"shard-{s:05d}", w.close(), {"n_rows": w.n_rows})
    n_rows += w.n_rows
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
del x, w
from raylens.io.memory import limit_malloc_arenas
limit_malloc_arenas(2)  # as the trainer's streams do (actors.trainer.ConceptTrainer._stream)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = status("VmRSS")
seen = sum(len(b) for b in ActivationStream(store, batch_rows=256, readers=readers, prefetch=prefetch,
                                            shuffle_buffer=shuffle))
print(json.dumps({"rows": seen, "expected": n_rows, "growth": status("VmHWM") - base}))
"""


def _read_growth(out, d: int, window: int, cap: int, readers: int, prefetch: int, n_shards: int = 2,
                 shuffle: int = 0) -> dict:
    """Write ``n_shards`` shards of 8,192 rows and stream them in a fresh process: its rows and
    the growth of its peak RSS (VmHWM) over the stream."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _READ_CHILD, str(out), *map(str, (d, window, cap, readers, prefetch,
                                                                                  n_shards, shuffle))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reader_memory_follows_the_row_group_cap_not_the_window(tmp_path):
    """Files written in windows of 4 or 32 MiB, both with row groups capped at 2 MiB: the stream's
    peak memory (a fresh process's VmHWM) stays under readers x prefetch x (the cap x 3: the row
    group read and its float32 decode, + a batch) + 64 MiB, and does not depend on the window.
    Without the cap a row group is a whole window: measured 325 MiB with 32 MiB windows, 85 MiB
    with 4 MiB ones (59-73 MiB with the cap, either window; 35 MiB with one reader, prefetch 1;
    39-41 MiB since the child serves large allocations from mmap, as the trainer does)."""
    import pyarrow.parquet as pq

    d, cap, readers, prefetch = 2048, 2 * 2**20, 2, 2
    growth = {}
    for window in (1024, 8192):  # 4 MiB and 32 MiB of float16
        out = tmp_path / f"w{window}"
        r = _read_growth(out, d, window, cap, readers, prefetch)
        assert r["rows"] == r["expected"] == 16384
        meta = pq.ParquetFile(str(out / "activations" / "shard-00000.parquet")).metadata
        sizes = [meta.row_group(g).column(1).total_uncompressed_size for g in range(meta.num_row_groups)]
        assert max(sizes) <= cap * 1.05 and meta.num_row_groups >= 16, sizes
        growth[window] = r["growth"]
    bound = readers * prefetch * (cap * 3 + 256 * d * 4) + 64 * 2**20
    print({w: round(g / 2**20, 1) for w, g in growth.items()}, "MiB; bound", bound / 2**20)
    assert max(growth.values()) < bound, growth
    assert abs(growth[8192] - growth[1024]) < 24 * 2**20, growth


def test_stream_memory_does_not_grow_with_the_corpus(tmp_path):
    """The trainer's shuffled stream over 2 and over 8 shards (64 and 256 MiB of float16, row
    groups of 2 MiB), two fresh processes each: every pass's peak RSS growth stays under
    readers x prefetch x (a row group in its stored dtype + a float32 batch) + twice the
    shuffle buffer in float16 + 64 MiB, and the least growth of each size is the same within
    16 MiB. Least of two: a peak is a maximum over the pass, and a longer pass samples more
    interleavings of the reader threads with the consumer. The child caps glibc at two malloc
    arenas, as the trainer does. History of the growth (2 / 8 / 16 shards): float32 row groups
    and shuffle blocks, each block copied once more at the batch cut: 195 / 204 MiB; float16 to
    the batch cut: 83-87 / 90 / 93-103 with glibc's and Arrow's default allocators, 75-80 /
    78-83 / 77-78 with every large block from mmap; a shuffle buffer reused for the whole pass
    (rows gathered in a permuted order at the batch cut) instead of a fresh block shuffled in
    place: 48-56 with mmap, 32-38 with two arenas (2 to 64 shards; mmap read 2.1x slower)."""
    d, cap, readers, prefetch, shuffle = 2048, 2 * 2**20, 2, 2, 16 * 256
    growth = {}
    for n in (2, 8):
        growth[n] = []
        for run in range(2):
            r = _read_growth(tmp_path / f"s{n}-{run}", d, 1024, cap, readers, prefetch, n_shards=n, shuffle=shuffle)
            assert r["rows"] == r["expected"] == n * 8192
            growth[n].append(r["growth"])
    bound = readers * prefetch * (cap + 256 * d * 4) + 2 * shuffle * d * 2 + 64 * 2**20
    print({n: [round(g / 2**20, 1) for g in gs] for n, gs in growth.items()}, "MiB; bound", bound / 2**20)
    assert max(max(gs) for gs in growth.values()) < bound, growth
    assert abs(min(growth[8]) - min(growth[2])) < 16 * 2**20, growth


def _stream_threads() -> int:
    import threading

    return sum(t.name == "activation-stream" and t.is_alive() for t in threading.enumerate())


def _wait_for(cond, seconds: float = 5.0) -> bool:
    import time

    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_read_ahead_gives_the_same_passes_and_stops_on_close(tmp_path):
    """A stream told its ``epochs`` reads the next pass while the consumer is on the current
    one (a producer thread is alive once pass 0 is consumed, none without ``epochs``), gives
    exactly the batches of a stream without read-ahead for every pass (also after a
    ``set_epoch`` that skips the pass read ahead), and ``close()`` stops the read-ahead."""
    import time

    rng = np.random.default_rng(2)
    store = OutputStore(str(tmp_path / "out"))
    for s in range(4):
        store.write_shard("activations", f"shard-{s:05d}", _table(_docs(s), rng))
    kw = dict(batch_rows=10, shuffle_buffer=100, seed=3, readers=2, prefetch=2)  # 84 batches, queue of 4
    plain = ActivationStream(store, **kw)
    expected = []
    for e in range(4):
        plain.set_epoch(e)
        expected.append(_rows(plain))
    assert _wait_for(lambda: _stream_threads() == 0)
    with ActivationStream(store, epochs=4, **kw) as ahead:
        assert np.array_equal(_rows(ahead), expected[0])
        time.sleep(0.3)  # pass 0's producer has ended; pass 1's waits on its full queue
        assert _stream_threads() == 1  # pass 1, produced before anyone asked
        assert np.array_equal(_rows(ahead), expected[1])
        ahead.set_epoch(3)  # pass 2 was read ahead: dropped, pass 3 read instead
        assert np.array_equal(_rows(ahead), expected[3])
        assert _wait_for(lambda: _stream_threads() == 0)  # no pass 4: nothing read ahead
        ahead.set_epoch(0)
        batches = iter(ahead)
        assert np.array_equal(next(batches).numpy(), expected[0][:10])
        del batches  # a consumer that stops early: its producer stops
    assert _wait_for(lambda: _stream_threads() == 0)  # the read-ahead of pass 1 stopped by close()
    assert not list(ActivationStream(store, split="heldout", heldout_fraction=0.0, epochs=2))


def test_finite_rows_on_float16_bits():
    """The float16 bit test keeps exactly the rows ``np.isfinite`` keeps, over every bit
    pattern (infinities, NaNs of any payload, subnormals, the largest finite value)."""
    from raylens.io.readers import finite_rows

    bits = np.arange(2**16, dtype=np.uint16)
    rng = np.random.default_rng(0)
    x = np.concatenate([bits, rng.permutation(bits)]).reshape(-1, 64).view(np.float16)
    x = np.concatenate([x, rng.normal(size=(50, 64)).astype(np.float16)])
    with np.errstate(invalid="ignore"):
        assert np.array_equal(finite_rows(x), np.isfinite(x).all(axis=1))
        assert 50 < finite_rows(x).sum() < len(x) - 50  # both kinds, many of each
        assert np.array_equal(finite_rows(x[:, :0]), np.ones(len(x), bool))
    y = x.astype(np.float32)
    assert np.array_equal(finite_rows(y), np.isfinite(y).all(axis=1))


def test_stored_dtype_stream_trains_the_same_model(tmp_path):
    """``float32=False`` yields the float16 rows as stored (for a GPU trainer to cast on its
    device); an SAE fitted on it equals, bit for bit, one fitted on the float32 stream (the
    SAE's re-batching casts after the copy to its device)."""
    from raylens.concepts.models import build_concept_model
    from raylens.io.schemas import activation_array

    rng = np.random.default_rng(4)
    store = OutputStore(str(tmp_path / "out"))
    for s in range(2):
        doc = _docs(s)
        x = rng.normal(size=(len(doc), 16)).astype(np.float16)
        store.write_shard("activations", f"shard-{s:05d}",
                          pa.table({"doc_id": pa.array(doc, pa.int64()), "activation": activation_array(x)}))
    kw = dict(batch_rows=64, shuffle_buffer=128, seed=1, epochs=2)
    stored, cast = ActivationStream(store, float32=False, **kw), ActivationStream(store, **kw)
    b16, b32 = list(stored), list(cast)
    assert {b.dtype for b in b16} == {torch.float16} and {b.dtype for b in b32} == {torch.float32}
    assert all(torch.equal(a.float(), b) for a, b in zip(b16, b32)) and len(b16) == len(b32)
    models = []
    for stream in (stored, cast):
        m = build_concept_model("topk_sae", nb_concepts=24, d_model=16, top_k=4, epochs=2, batch_size=32, seed=0)
        m.fit_stream(stream, progress=False)
        models.append(m)
    a, b = (m.sae.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rows_where_equals_filter_without_copying_long_runs():
    """`rows_where` gives the rows `Table.filter` gives (per-document masks, empty, full); with
    runs of at least ``MIN_RUN_BYTES`` on average as slices of the table's own buffers (the same
    rows per document are copied when narrow, sliced when wide); and refuses a mask of another
    length."""
    from raylens.io.readers import MIN_RUN_BYTES, heldout_mask, rows_where
    from raylens.io.schemas import activation_array

    rng = np.random.default_rng(0)
    for d, rows_per_doc, sliced in ((32, 1, False), (32, 4, False), (2048, 4, True), (32, 4 * MIN_RUN_BYTES // 64, True)):
        docs = np.repeat(np.arange(200), rows_per_doc)
        table = pa.table({"doc_id": docs}).append_column(
            "activation", activation_array(rng.standard_normal((len(docs), d)).astype(np.float16)))
        buf = table["activation"].chunk(0).buffers()[1]
        for mask in (heldout_mask(docs, 0.3), ~heldout_mask(docs, 0.3), np.zeros(len(docs), bool),
                     np.ones(len(docs), bool)):
            got = rows_where(table, mask)
            assert got.equals(table.filter(mask)) and got.num_rows == mask.sum()
            shared = [buf.address <= c.buffers()[1].address < buf.address + buf.size
                      for c in got["activation"].chunks if len(c)]
            assert set(shared) <= {sliced or bool(mask.all())}, (d, rows_per_doc, shared)  # one run: a slice
            if sliced and mask.any():
                assert all(shared), (d, rows_per_doc)
        with pytest.raises(ValueError, match="mask of shape"):
            rows_where(table, np.ones(len(docs) - 1, bool))


@pytest.mark.parametrize("shuffle_buffer", [30, 100, 1000])
def test_shuffle_equals_blocks_shuffled_in_place(tmp_path, shuffle_buffer):
    """The documented order: consecutive blocks of exactly ``shuffle_buffer`` rows of the stream
    order (the last shorter), each shuffled by ``np.random.default_rng(seed + epoch).shuffle``,
    whatever the row groups (40 rows: more or fewer than a block), the batch cut (33 rows, across
    blocks) and the output dtype; the reused buffer leaves no row of one block in the next."""
    rng = np.random.default_rng(2)
    store = OutputStore(str(tmp_path / "out"))
    for s in range(3):
        store.write_shard("activations", f"shard-{s:05d}", _table(_docs(s), rng))
    import pyarrow.parquet as pq
    for s in range(3):
        p = store.path("activations", f"shard-{s:05d}.parquet")
        pq.write_table(pq.read_table(p), p, row_group_size=40)
    order = _rows(ActivationStream(store, batch_rows=33))
    for epoch in (0, 1):
        g = np.random.default_rng(7 + epoch)
        expected = order.copy()
        for a in range(0, len(expected), shuffle_buffer):
            g.shuffle(expected[a: a + shuffle_buffer])
        for float32 in (True, False):
            stream = ActivationStream(store, batch_rows=33, shuffle_buffer=shuffle_buffer, seed=7, float32=float32)
            stream.set_epoch(epoch)
            batches = list(stream)
            assert [len(b) for b in batches[:-1]] == [33] * (len(batches) - 1)
            assert np.array_equal(torch.cat(batches).numpy(), expected), (epoch, float32)

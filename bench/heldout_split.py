"""Where the held-out split of an extraction window should slice instead of copy: the
constant ``raylens.io.readers.MIN_RUN_ROWS``.

Extraction splits each window of activation rows by document into train and held-out rows
(`raylens.io.readers.rows_where`) and writes both to Parquet
(`raylens.io.activation_writer.ActivationShardWriter`). The rows of a document come in a run,
so the split can be zero-copy slices of the runs (one chunk per run: the Parquet writer then
pays per chunk) or a copy by ``Table.filter`` (one copy per row, contiguous output). This bench
times both, split plus write of both parts, on the same window (``--rows`` rows of float16,
the job's Parquet options), for documents of 1 to 256 rows, at d_model 256 and 2048, with
large allocations from mmap as in an extraction worker (``--no-mmap``: glibc's defaults). It
prints seconds per window (median of ``--repeats``, interleaved) and slices / filter: below 1
slicing is faster. ``rows_where`` slices when the mean run is at least ``MIN_RUN_ROWS`` rows.

    python bench/heldout_split.py [--rows 65536] [--repeats 5] [--dims 256,2048] [--no-mmap]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylens.io.readers import MIN_RUN_ROWS, heldout_mask  # noqa: E402
from raylens.io.schemas import activation_array, activation_parquet_options, activations_schema  # noqa: E402


def window(n_rows: int, d: int, run: int) -> tuple[pa.Table, np.ndarray]:
    """A window of ``n_rows`` float16 rows, documents of ``run`` rows, and its held-out mask."""
    doc = np.arange(n_rows) // run
    x = np.random.default_rng(0).standard_normal((n_rows, d)).astype(np.float16)
    schema = pa.schema([activations_schema(d).field("doc_id"), activations_schema(d).field("activation")])
    table = pa.Table.from_arrays([pa.array(doc, pa.int64()), activation_array(x)], schema=schema)
    return table, heldout_mask(doc, 0.1)


def sliced(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """Zero-copy slices of the runs of ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return pa.concat_tables([table.slice(a, b - a) for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist())])


def split_and_write(table: pa.Table, mask: np.ndarray, folder: str, select) -> float:
    """Seconds to select the held-out and the train rows with ``select`` and write each to its
    Parquet file with the job's options."""
    opts = activation_parquet_options(table.schema)
    t = time.perf_counter()
    for name, m in (("heldout", mask), ("train", ~mask)):
        part = select(table, m)
        with pq.ParquetWriter(os.path.join(folder, f"{name}.parquet"), table.schema, **opts) as w:
            w.write_table(part)
        del part
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dims", default="256,2048")
    ap.add_argument("--runs", default="1,4,8,16,32,64,256", help="rows per document")
    ap.add_argument("--no-mmap", action="store_true")
    args = ap.parse_args()
    if not args.no_mmap:
        from raylens.io.memory import mmap_large_allocations

        mmap_large_allocations()
    print(f"# bench/heldout_split.py on {platform.node()}: {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load {os.getloadavg()[0]:.2f}; {args.rows} rows per window, float16, held-out fraction 0.1, "
          f"{'glibc defaults' if args.no_mmap else 'mmap for allocations >= 1 MiB (as extraction workers)'}; "
          f"median of {args.repeats}; rows_where slices from a mean run of {MIN_RUN_ROWS} rows")
    print(f"{'d_model':>7s} {'rows/doc':>8s} {'filter s':>9s} {'slices s':>9s} {'slices/filter':>14s}")
    with tempfile.TemporaryDirectory() as folder:
        for d in map(int, args.dims.split(",")):
            for run in map(int, args.runs.split(",")):
                table, mask = window(args.rows, d, run)
                times = {"filter": [], "slices": []}
                for _ in range(args.repeats):
                    times["filter"].append(split_and_write(table, mask, folder, lambda t, m: t.filter(m)))
                    times["slices"].append(split_and_write(table, mask, folder, sliced))
                f, s = (statistics.median(times[k]) for k in ("filter", "slices"))
                print(f"{d:7d} {run:8d} {f:9.3f} {s:9.3f} {s / f:13.2f}x", flush=True)


if __name__ == "__main__":
    main()

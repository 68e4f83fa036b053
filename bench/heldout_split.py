"""Where the held-out split of an extraction window should slice instead of copy: the
constant ``raylens.io.readers.MIN_RUN_BYTES``.

Extraction splits each window of activation rows by document into train and held-out rows
(`raylens.io.readers.rows_where`) and writes both to Parquet
(`raylens.io.activation_writer.ActivationShardWriter`). The rows of a document come in a run,
so the split can be zero-copy slices of the runs (one chunk per run: the Parquet writer then
pays per chunk) or a copy by ``Table.filter`` (one copy per row, contiguous output). This bench
times both, selection plus write of each part (held-out, 10% of the documents, and train), on
the same window (``--rows`` rows of float16, the job's Parquet options), for documents of 1 to
256 rows, at d_model 256 and 2048, with large allocations from mmap as in an extraction worker
(``--no-mmap``: glibc's defaults). A part's runs are what matters: consecutive train documents
merge into one run, so train runs are about ten times a document's rows. It prints, per part,
the mean run of its mask, seconds (median of ``--repeats``, interleaved), slices / filter
(below 1 slicing is faster) and ``rows_where`` (slices from a mean run of ``MIN_RUN_BYTES``)
against the faster of the two (about 1 when it picks right).

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

from raylens.io.readers import MIN_RUN_BYTES, heldout_mask, mask_runs, rows_where  # noqa: E402
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
    return pa.concat_tables([table.slice(a, b - a) for a, b in zip(*mask_runs(mask))])


def mean_run(mask: np.ndarray) -> float:
    """Mean length of the runs of True in ``mask``."""
    return float(mask.sum()) / max(1, len(mask_runs(mask)[0]))


def select_and_write(table: pa.Table, mask: np.ndarray, path: str, select) -> float:
    """Seconds to select the rows of ``mask`` with ``select`` and write them to a Parquet file
    with the job's options."""
    t = time.perf_counter()
    part = select(table, mask)
    with pq.ParquetWriter(path, table.schema, **activation_parquet_options(table.schema)) as w:
        w.write_table(part)
    del part
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dims", default="256,2048")
    ap.add_argument("--runs", default="1,2,3,4,8,32,256", help="rows per document")
    ap.add_argument("--no-mmap", action="store_true")
    args = ap.parse_args()
    if not args.no_mmap:
        from raylens.io.memory import mmap_large_allocations

        mmap_large_allocations()
    print(f"# bench/heldout_split.py on {platform.node()}: {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load {os.getloadavg()[0]:.2f}; {args.rows} rows per window, float16, held-out fraction 0.1, "
          f"{'glibc defaults' if args.no_mmap else 'mmap for allocations >= 1 MiB (as extraction workers)'}; "
          f"median of {args.repeats}; rows_where slices from a mean run of {MIN_RUN_BYTES} bytes")
    print(f"{'d_model':>7s} {'rows/doc':>8s} {'part':>8s} {'mean run':>9s} {'filter s':>9s} {'slices s':>9s} "
          f"{'slices/filter':>14s} {'rows_where/best':>16s}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "part.parquet")
        ways = {"filter": lambda t, m: t.filter(m), "slices": sliced, "rows_where": rows_where}
        for d in map(int, args.dims.split(",")):
            for run in map(int, args.runs.split(",")):
                table, held = window(args.rows, d, run)
                for part, mask in (("heldout", held), ("train", ~held)):
                    times = {k: [] for k in ways}
                    for _ in range(args.repeats):
                        for k, select in ways.items():
                            times[k].append(select_and_write(table, mask, path, select))
                    f, s, w = (statistics.median(times[k]) for k in ways)
                    print(f"{d:7d} {run:8d} {part:>8s} {mean_run(mask):9.1f} {f:9.4f} {s:9.4f} {s / f:13.2f}x "
                          f"{w / min(f, s):15.2f}x", flush=True)


if __name__ == "__main__":
    main()

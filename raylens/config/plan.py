"""A dry run: what a job will need and produce, from its config, the model's config (a skeleton
on the meta device, no weights) and a sample of the corpus tokenised. Nothing is loaded onto a
device and Ray is not started (``python -m jobs.concepts --config X --plan``).

Estimates and where their constants come from:

* weights: parameter counts of the skeleton times the bytes of ``model.dtype``; extraction loads
  the embeddings and the blocks up to the split only (:func:`raylens.models.split.load_split_model`);
  importance and vocabulary projection load the whole model (sharded over ``gpus_per_worker``).
* activation rows: counted exactly on a seeded sample of the corpus (tokenised, truncated to
  ``extraction.max_tokens``), scaled to the document count and, with token sampling
  (``extraction.max_rows_per_document``, ``row_sampling_rate``), to the rows kept; bytes on disk
  are the payload (rows x d_model x 2 or 4 bytes, stored uncompressed: ``bench/activation_io.py``)
  plus the per-row columns.
* host RAM of an extraction worker: :data:`RUNTIME_BYTES` (Python, torch, transformers, nnsight
  and the first forward's allocator pools: about 0.7 GiB measured on the 2-core CPU machine: a
  plain SmolLM2 extraction's peak minus its weights, 0.97-1.06 GiB - 0.32 GiB, and a Ray extraction
  worker of a 50 MB model, 0.75 GiB in bench/scale_results.txt) + the weights and one batch's working set when they live
  on the CPU + one extraction window (:func:`raylens.models.split.window_rows`: at most
  ``extraction.max_host_bytes``, fewer rows when the shard is smaller) + :data:`ALLOCATOR_SLACK_BYTES`.
* GPU memory of extraction: weights + one batch's working set (hidden states, attention scores
  and the MLP's intermediate activations of one block) + :data:`CUDA_CONTEXT_BYTES`.
* times: model FLOPs (2 x parameters per token through the blocks, plus attention) over a
  throughput: on CPU the one measured by ``bench/extraction.py`` (1,251 tokens/s for SmolLM2 to
  layer 15 of 30 on 2 cores, about 0.13 TFLOP/s); on GPU an assumed 40% of an H100's 989 dense
  bf16 TFLOP/s until ``bench/gpu.py`` measures it. SAE epochs: 6 x d_model x nb_concepts FLOPs per
  row (forward and backward of encoder and decoder).
"""

from __future__ import annotations

import math
from typing import Any

#: Host memory of a worker before its shard's rows: interpreter, libraries, allocator pools (bytes).
RUNTIME_BYTES = 0.7 * 2**30
#: Host memory the allocators (glibc, pyarrow, tokenizers, Python objects) keep beyond the model,
#: one batch and the window's budget: the plan's margin. Extraction hands freed memory back between
#: windows and serves large blocks with mmap (raylens.io.memory.release_host_memory,
#: mmap_large_allocations): growth over one batch's peak measured under the budget itself at 10x
#: the budget (tests/test_activation_storage.py), so this is a small margin only (it was 96 MiB
#: when the growth was 106-183 MiB over a 16 MiB budget; the plan then read 1.21-1.27x a real
#: SmolLM2 extraction's 1.10-1.16 GB peak, tests/test_plan.py).
ALLOCATOR_SLACK_BYTES = 32 * 2**20
#: CUDA context and caching-allocator slack of one process on one GPU (bytes).
CUDA_CONTEXT_BYTES = 0.6 * 2**30
#: CPU extraction throughput measured by bench/extraction.py (FLOP/s, SmolLM2 on 2 cores).
CPU_FLOPS = 0.13e12
#: Assumed GPU throughput until bench/gpu.py measures one (FLOP/s: 40% of an H100's dense bf16).
GPU_FLOPS = 0.4 * 989e12
#: Share of the activation payload on disk: the column is stored uncompressed (raylens.io.schemas).
ACTIVATION_DISK_KEEP = 1.0
#: Bytes per row of the columns beside the activation, plus the row's text (mean chars added).
ROW_COLUMN_BYTES = 48

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _n_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _model_numbers(name: str, task: str | None, split_point: int | str, dtype: str) -> dict[str, Any]:
    """Parameter counts of the whole model and of what extraction loads (meta device).

    Raises:
        ConfigError: through :func:`raylens.config.preflight.check_model` for a bad model or split.
    """
    import torch
    from transformers import AutoModel

    from raylens.config.preflight import check_model
    from raylens.models.loading import truncated_config
    from raylens.models.split import block_index, layer_stack

    skeleton, task, path = check_model(name, task, split_point)
    cfg = skeleton.config
    _, layers = layer_stack(skeleton)
    index = block_index(skeleton, path)
    n_blocks = len(layers) if index is None else index + 1
    with torch.device("meta"):
        part = skeleton if index is None else AutoModel.from_config(truncated_config(cfg, n_blocks))
    embed = skeleton.get_input_embeddings().weight.numel()
    return {"architecture": type(skeleton).__name__, "task": task, "n_layers": len(layers), "split": path,
            "blocks_loaded": n_blocks, "d_model": int(cfg.hidden_size), "vocab_size": int(cfg.vocab_size),
            "intermediate_size": int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
            "n_heads": int(cfg.num_attention_heads), "params_total": _n_params(skeleton),
            "params_extraction": _n_params(part), "params_per_token": _n_params(part) - embed,
            "bytes_per_param": _DTYPE_BYTES[dtype]}


def _corpus_numbers(cfg: Any, sample_docs: int, *, max_tokens: int, exclude_first_tokens: int = 0,
                    granularity: str = "token") -> dict[str, Any]:
    """Document count and, from a tokenised sample, tokens and activation rows per document."""
    import numpy as np
    import pyarrow as pa
    from transformers import AutoTokenizer

    from raylens.data.corpora import iter_corpus
    from raylens.models.builtins import BUILTIN_MODELS, builtin_config_path

    c = cfg.corpus
    sample = pa.concat_tables(list(iter_corpus(c.source, text_column=c.text_column, label_column=c.label_column,
                                               limit=sample_docs, shuffle_seed=c.shuffle_seed)))
    n_docs = c.limit if c.limit is not None else _count_documents(c)
    source = str(builtin_config_path(cfg.model.name)) if cfg.model.name in BUILTIN_MODELS else cfg.model.name
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    texts = [t for t in sample["text"].to_pylist() if t and t.strip()]
    enc = tok(texts, truncation=True, max_length=max_tokens, return_special_tokens_mask=True)
    tokens = np.array([len(ids) for ids in enc["input_ids"]])
    content = np.array([sum(1 - s for s in sp[exclude_first_tokens:]) for sp in enc["special_tokens_mask"]])
    rows = {"token": content.mean(), "sample_mean": 1.0, "cls": 1.0,
            "word": content.mean() * 0.8, "sentence": max(1.0, content.mean() / 20)}[granularity]
    n_docs = min(n_docs, sample.num_rows) if sample.num_rows < sample_docs else n_docs
    return {"n_docs": int(n_docs), "sample_docs": len(texts), "tokens_per_doc": float(tokens.mean()),
            "max_tokens_seen": int(tokens.max()) if len(tokens) else 0, "rows_per_doc": float(rows),
            "text_chars_per_row": float(np.mean([len(t) for t in texts]) / max(rows, 1.0)) if texts else 0.0}


def _kept_rows_per_doc(rows_per_doc: float, ex: Any) -> float:
    """Rows per document after token sampling (``row_sampling_rate``, then ``max_rows_per_document``)."""
    kept = rows_per_doc * ex.row_sampling_rate
    return min(kept, ex.max_rows_per_document) if ex.max_rows_per_document is not None else kept


def _count_documents(corpus: Any) -> int:
    """Rows of the corpus: from the Parquet footers (or one CSV scan) for a file, folder or URI;
    by streaming it otherwise (built-ins, JSON lines, ``datasets`` names)."""
    from pathlib import Path

    from raylens.data.corpora import file_dataset, iter_corpus

    source = corpus.source
    if (Path(source).exists() or "://" in source) and Path(source).suffix.lower() not in (".json", ".jsonl"):
        return file_dataset(source).count_rows()
    return sum(t.num_rows for t in iter_corpus(corpus.source, text_column=corpus.text_column,
                                               label_column=corpus.label_column, chunk_rows=65536))


def _batch_working_set(m: dict, batch: int, length: int, nbytes: int) -> float:
    """Bytes of one block's activations for one batch: hidden states (a few copies), the MLP's
    intermediate, the attention scores."""
    return batch * length * (6 * m["d_model"] + 3 * m["intermediate_size"] + m["n_heads"] * length) * nbytes


def plan_concept_job(cfg: Any, *, sample_docs: int = 200) -> dict[str, Any]:
    """What the concept job ``cfg`` will need and produce (see the module docstring for the sources
    of each estimate). Reads the model's config and ``sample_docs`` documents; loads no weights.

    Returns:
        A dict of numbers: ``model``, ``corpus``, ``activations`` (rows, bytes, shards),
        ``memory`` (bytes: weights per GPU, extraction GPU peak, host RAM per worker) and
        ``seconds`` (stage estimates) with ``throughput_source`` saying where throughputs come from.

    Raises:
        ConfigError: through :func:`raylens.config.preflight.check_model` for a bad model or split.
    """
    from raylens.models.split import WINDOW_COPIES, row_host_bytes, window_rows

    ex, res = cfg.extraction, cfg.resources
    m = _model_numbers(cfg.model.name, cfg.model.task, ex.split_point, cfg.model.dtype)
    c = _corpus_numbers(cfg, sample_docs, max_tokens=ex.max_tokens, exclude_first_tokens=ex.exclude_first_tokens,
                        granularity=ex.granularity)
    value_bytes = _DTYPE_BYTES[ex.activation_dtype]
    rows = c["n_docs"] * _kept_rows_per_doc(c["rows_per_doc"], ex)
    payload = rows * m["d_model"] * value_bytes
    on_disk = payload * ACTIVATION_DISK_KEEP + rows * (ROW_COLUMN_BYTES + c["text_chars_per_row"])
    n_shards = math.ceil(c["n_docs"] / ex.shard_size)
    shard_rows = min(ex.shard_size, c["n_docs"]) * _kept_rows_per_doc(c["rows_per_doc"], ex)
    on_gpu = res.gpus_per_worker > 0
    w_extract = m["params_extraction"] * m["bytes_per_param"]
    w_full = m["params_total"] * m["bytes_per_param"]
    length = min(ex.max_tokens, max(1, c["max_tokens_seen"]))
    working = _batch_working_set(m, ex.batch_size, length, m["bytes_per_param"] if on_gpu else 4)
    window = min(shard_rows, window_rows(ex.max_host_bytes, m["d_model"], ex.activation_dtype))
    host = RUNTIME_BYTES + (0 if on_gpu else w_extract + working) + ALLOCATOR_SLACK_BYTES \
        + window * WINDOW_COPIES * row_host_bytes(m["d_model"], ex.activation_dtype)
    tokens = c["n_docs"] * c["tokens_per_doc"]
    flops_extract = 2 * m["params_per_token"] * tokens
    n_gpus = max(1, res.num_workers * math.ceil(res.gpus_per_worker)) if on_gpu else 0
    speed = GPU_FLOPS * n_gpus if on_gpu else CPU_FLOPS * res.num_workers
    params = cfg.concepts.params
    epochs = int(params.get("epochs", 1)) if isinstance(params, dict) else 1
    flops_fit = 6 * m["d_model"] * cfg.concepts.nb_concepts * rows * epochs
    fit_speed = GPU_FLOPS if res.trainer_gpus > 0 else CPU_FLOPS
    return {
        "job": "concepts", "model": m, "corpus": c,
        "activations": {"rows": int(rows), "payload_bytes": int(payload), "disk_bytes": int(on_disk),
                        "n_shards": n_shards, "rows_per_shard": int(shard_rows),
                        "disk_bytes_per_shard": int(on_disk / max(n_shards, 1))},
        "memory": {"weights_extraction_bytes": int(w_extract), "weights_full_bytes": int(w_full),
                   "weights_full_per_gpu_bytes": int(w_full / max(1, math.ceil(res.gpus_per_worker)))
                   if on_gpu else 0,
                   "extraction_device": "one GPU" if on_gpu else "CPU",
                   "extraction_gpu_peak_bytes": int(w_extract + working + CUDA_CONTEXT_BYTES) if on_gpu else 0,
                   "host_ram_per_worker_bytes": int(host)},
        "seconds": {"extraction": flops_extract / speed, "fit": flops_fit / fit_speed},
        "throughput_source": ("assumed 40% of an H100's dense bf16 FLOP/s per GPU (bench/gpu.py will measure)"
                              if on_gpu else "bench/extraction.py on 2 CPU cores (1,251 tokens/s, SmolLM2)"),
    }


def _whole_model_plan(cfg: Any, sample_docs: int, max_tokens: int) -> tuple[Any, dict[str, Any]]:
    """The model skeleton and the plan parts of a job whose workers hold the whole model:
    ``model``, ``corpus`` and ``memory`` (weights, per GPU, host RAM per worker)."""
    from raylens.config.preflight import check_model

    skeleton, task, _ = check_model(cfg.model.name, cfg.model.task)
    res = cfg.resources
    n_params = _n_params(skeleton)
    weights = n_params * _DTYPE_BYTES[cfg.model.dtype]
    on_gpu = res.gpus_per_worker > 0
    return skeleton, {
        "model": {"architecture": type(skeleton).__name__, "task": task, "params_total": n_params},
        "corpus": _corpus_numbers(cfg, sample_docs, max_tokens=max_tokens),
        "memory": {"weights_full_bytes": int(weights),
                   "weights_full_per_gpu_bytes": int(weights / max(1, math.ceil(res.gpus_per_worker)))
                   if on_gpu else 0,
                   "host_ram_per_worker_bytes": int(RUNTIME_BYTES + (0 if on_gpu else weights))}}


def plan_attribution_job(cfg: Any, *, sample_docs: int = 200) -> dict[str, Any]:
    """What the attribution job ``cfg`` will need and produce: the whole model's weights per
    worker, the documents, output rows and shards, host RAM per worker. No throughput is
    estimated for attributions (their cost depends on each method's samples; see
    ``bench/attribution_job.py``).

    Raises:
        ConfigError: through :func:`raylens.config.preflight.check_model` for a bad model.
    """
    a = cfg.attribution
    skeleton, plan = _whole_model_plan(cfg, sample_docs, a.max_tokens)
    n_targets = int(getattr(skeleton.config, "num_labels", 1)) if a.targets == "all_classes" else 1
    n_docs = plan["corpus"]["n_docs"]
    return {"job": "attribute", **plan, "rows": n_docs * len(a.methods) * n_targets,
            "n_shards": math.ceil(n_docs / a.shard_size)}


def plan_network_job(cfg: Any, *, sample_docs: int = 200) -> dict[str, Any]:
    """What the network job ``cfg`` will need and produce: the whole model's weights per worker,
    the documents, lens rows (documents x lenses x layers x tokens) and shards, head-gating rows
    (seeds x layers x heads), host RAM per worker.

    Raises:
        ConfigError: through :func:`raylens.config.preflight.check_model` for a bad model.
    """
    skeleton, plan = _whole_model_plan(cfg, sample_docs, cfg.lens.max_tokens)
    mc = skeleton.config
    layers = len(cfg.lens.layers) if cfg.lens.layers is not None else int(mc.num_hidden_layers) + 1
    c = plan["corpus"]
    return {**plan, "job": "network", "rows": int(c["n_docs"] * min(c["tokens_per_doc"], cfg.lens.max_tokens)
                                                  * layers * len(cfg.lens.lenses)),
            "n_shards": math.ceil(c["n_docs"] / cfg.lens.shard_size), "layers": layers,
            "head_rows": len(cfg.head_gating.seeds) * int(mc.num_hidden_layers) * int(mc.num_attention_heads)
            if cfg.head_gating.enabled else 0}


def plan_job(cfg: Any, *, sample_docs: int = 200) -> dict[str, Any]:
    """:func:`plan_concept_job`, :func:`plan_attribution_job` or :func:`plan_network_job`, by the
    config's kind."""
    if hasattr(cfg, "extraction"):
        return plan_concept_job(cfg, sample_docs=sample_docs)
    if hasattr(cfg, "lens"):
        return plan_network_job(cfg, sample_docs=sample_docs)
    return plan_attribution_job(cfg, sample_docs=sample_docs)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:,.0f} min" if seconds < 5400 else f"{seconds / 3600:,.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines a user reads before a run."""
    if plan["job"] in ("attribute", "network"):
        m, c, mem = plan["model"], plan["corpus"], plan["memory"]
        output = (f"{plan['rows']:,} attribution rows in {plan['n_shards']:,} shards" if plan["job"] == "attribute"
                  else f"about {plan['rows']:,} lens rows ({plan['layers']} layers) in {plan['n_shards']:,} shards; "
                       f"{plan['head_rows']:,} head-gating rows")
        return "\n".join([
            f"model        {m['architecture']} ({m['task']}): {m['params_total'] / 1e6:,.1f}M parameters, "
            f"{_gib(mem['weights_full_bytes'])} per worker"
            + (f" ({_gib(mem['weights_full_per_gpu_bytes'])} per GPU)" if mem["weights_full_per_gpu_bytes"] else ""),
            f"corpus       {c['n_docs']:,} documents; sample of {c['sample_docs']}: {c['tokens_per_doc']:.1f} tokens "
            f"per document",
            f"output       {output}",
            f"memory       host RAM per worker about {_gib(mem['host_ram_per_worker_bytes'])}",
        ])
    m, c, a, mem, s = plan["model"], plan["corpus"], plan["activations"], plan["memory"], plan["seconds"]
    return "\n".join([
        f"model        {m['architecture']} ({m['task']}): {m['n_layers']} layers, d_model {m['d_model']}, "
        f"{m['params_total'] / 1e6:,.1f}M parameters, {_gib(mem['weights_full_bytes'])}",
        f"extraction   split at {m['split']}: loads {m['blocks_loaded']} of {m['n_layers']} blocks, "
        f"{m['params_extraction'] / 1e6:,.1f}M parameters, {_gib(mem['weights_extraction_bytes'])} on "
        f"{mem['extraction_device']}",
        f"corpus       {c['n_docs']:,} documents; sample of {c['sample_docs']}: {c['tokens_per_doc']:.1f} tokens "
        f"and {c['rows_per_doc']:.1f} activation rows per document",
        f"activations  {a['rows']:,} rows, {_gib(a['payload_bytes'])} of values, about {_gib(a['disk_bytes'])} "
        f"on disk in {a['n_shards']:,} shards ({a['rows_per_shard']:,} rows, {_gib(a['disk_bytes_per_shard'])} each)",
        f"memory       host RAM per extraction worker about {_gib(mem['host_ram_per_worker_bytes'])}"
        + (f"; extraction GPU peak about {_gib(mem['extraction_gpu_peak_bytes'])}; whole model per GPU "
           f"{_gib(mem['weights_full_per_gpu_bytes'])} (importance, vocabulary projection)"
           if mem["extraction_gpu_peak_bytes"] else ""),
        f"time         extraction about {_duration(s['extraction'])}, concept fit about {_duration(s['fit'])} "
        f"({plan['throughput_source']})",
    ])

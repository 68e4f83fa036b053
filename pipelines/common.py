"""Pieces both jobs share: driver messages, the corpus written once into document shards, and the
output-URI guard against resuming with other settings."""

from __future__ import annotations

import pyarrow as pa

from raylens.config import ConfigError
from raylens.data.corpora import iter_corpus
from raylens.io.schemas import DOCUMENTS_SCHEMA
from raylens.io.store import OutputStore, shard_name


def say(msg: str) -> None:
    """A driver progress line (visible in ``ray job logs``)."""
    print(f"[raylens] {msg}", flush=True)


def write_corpus_shards(store: OutputStore, source: str, *, text_column: str, label_column: str | None,
                        limit: int | None, shuffle_seed: int | None, shard_size: int) -> list[str]:
    """Stream the corpus into ``documents/`` shards of ``shard_size`` rows, once: a rerun reads the
    manifest written at the end. Returns the shard names.

    Raises:
        ConfigError: the corpus produced no documents.
    """
    if store.exists("documents", "_manifest.json"):
        return store.read_json("documents/_manifest.json")["shards"]
    shards, buf, n = [], [], 0
    chunks = iter_corpus(source, text_column=text_column, label_column=label_column, limit=limit,
                         shuffle_seed=shuffle_seed, chunk_rows=shard_size)

    def flush(tables: list[pa.Table]) -> None:
        name = shard_name(len(shards))
        store.write_shard("documents", name, pa.concat_tables(tables).cast(DOCUMENTS_SCHEMA))
        shards.append(name)

    for chunk in chunks:
        buf.append(chunk)
        n += chunk.num_rows
        while n >= shard_size:
            whole = pa.concat_tables(buf)
            flush([whole.slice(0, shard_size)])
            rest = whole.slice(shard_size)
            buf, n = ([rest] if rest.num_rows else []), rest.num_rows
    if n:
        flush(buf)
    if not shards:
        raise ConfigError(f"corpus.source {source!r} produced no documents")
    store.write_json("documents/_manifest.json", {"shards": shards})
    return shards


def check_job_key(store: OutputStore, key: dict, config: dict, output_uri: str) -> None:
    """Refuse to resume into ``output_uri`` when it holds results made with another ``key``
    (the settings that determine the rows); record ``key`` and the whole config otherwise.

    Raises:
        ConfigError: naming the settings that differ.
    """
    if store.exists("job_key.json"):
        old = store.read_json("job_key.json")
        if old != key:
            diffs = [f"{s}.{k}" for s in key for k in key[s] if old.get(s, {}).get(k) != key[s][k]]
            diffs += [s for s in old if s not in key]
            raise ConfigError(
                f"output_uri {output_uri!r} holds results made with other settings ({', '.join(diffs)}); "
                "use a new output_uri or delete the old one")
    else:
        store.write_json("job_key.json", key)
    store.write_json("config.json", config)

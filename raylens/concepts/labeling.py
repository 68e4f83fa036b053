"""The labelling step of the concept job as one library call: `label_and_score`.

From the tables the interpretation step writes (top examples, sampled examples,
non-activating runs, vocabulary projection), `label_and_score` asks an LLM for a label of
each of the most important concepts (`raylens.concepts.labels.label_concepts`), then
scores the first labelled ones with Delphi detection and fuzzing
(`raylens.concepts.scoring.score_labels`) on activating examples the labeler did not see.
With no endpoint configured it runs `raylens.llm.server.LocalLLMServer` on loopback for
the duration of the call. Usable in a notebook without Ray or an output store: it takes
pyarrow tables and plain values. This module does not import ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from raylens.concepts.labels import choose_sampled_examples, label_concepts
from raylens.concepts.scoring import score_labels
from raylens.llm.config import LabelerConfig, read_api_key

if TYPE_CHECKING:
    from raylens.config import LabelsConfig

log = logging.getLogger(__name__)

__all__ = ["example_from_row", "label_and_score", "unscored_rows"]

#: ``labels.example_sampling`` -> how `choose_sampled_examples` draws (None: top examples only).
_SAMPLED_HOW = {"top+quantile": "quantile", "top+random": "random"}


def example_from_row(row: Mapping[str, Any]) -> dict:
    """A row of ``concepts/top_examples.parquet`` or ``concepts/sampled_examples.parquet``
    (``context``, ``span_start``, ``span_end``, ``activation``, ``doc_id``, ``unit``,
    optional ``quantile``) as a label-prompt example: ``{"text", "spans": [[start, end]],
    "activation", "doc_id", "unit", "quantile"}`` (character offsets into ``text``)."""
    return {"text": row["context"], "spans": [[row["span_start"], row["span_end"]]],
            "activation": row["activation"], "doc_id": row["doc_id"], "unit": row["unit"],
            "quantile": row.get("quantile")}


def _rows_by_concept(table: pa.Table | None) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in ([] if table is None else table.to_pylist()):
        out.setdefault(r["concept"], []).append(r)
    return out


def unscored_rows(chosen: Sequence[int], labels: Mapping[int, Mapping[str, Any]], n_scored: int,
                  n_max: int) -> list[dict]:
    """Error rows (``{"concept", "label": None, "error"}``) for the concepts that would have
    been scored but have no label (endpoint down), up to ``n_max - n_scored`` of them."""
    return [{"concept": c, "label": None, "error": f"not scored: no label ({labels.get(c, {}).get('error')})"}
            for c in chosen if not labels.get(c, {}).get("label")][: max(0, n_max - n_scored)]


def _prepare(chosen: Sequence[int], settings: LabelsConfig, top: pa.Table, vocab: pa.Table,
             sampled: pa.Table | None, non_activating: pa.Table | None,
             seed: int) -> tuple[dict[int, dict], dict[int, dict]]:
    """The `label_concepts` input of each chosen concept, and its `score_labels` input without
    the label: the activating examples the labeler did not see (all of them when it saw every
    one) and the concept's non-activating runs."""
    tops, samples, quiet = _rows_by_concept(top), _rows_by_concept(sampled), _rows_by_concept(non_activating)
    voc = vocab.filter(pc.equal(vocab["direction"], "promoted")).to_pylist()
    how = _SAMPLED_HOW.get(settings.example_sampling)
    concepts, pools = {}, {}
    for c in chosen:
        ex = [example_from_row(r) for r in tops.get(c, [])]
        shown = sorted(ex, key=lambda e: -e["activation"])[: settings.n_examples]
        extra = choose_sampled_examples([example_from_row(r) for r in samples.get(c, [])],
                                        settings.n_sampled_examples, how, exclude=shown, seed=seed,
                                        concept=c) if how else []
        concepts[c] = {"examples": ex, "top_tokens": [r["token"] for r in voc if r["concept"] == c],
                       "sampled_examples": extra, "sampled_how": how or "quantile"}
        seen = {(e["doc_id"], e["unit"]) for e in shown + extra}
        every = {(r["doc_id"], r["unit"]): example_from_row(r) for r in tops.get(c, []) + samples.get(c, [])}
        unseen = [e for k, e in every.items() if k not in seen]
        pools[c] = {"examples": unseen or list(every.values()),
                    "non_activating": [r["text"] for r in quiet.get(c, [])]}
    return concepts, pools


def _label_then_score(chosen: Sequence[int], concepts: dict[int, dict], pools: dict[int, dict],
                      settings: LabelsConfig, endpoint: dict[str, Any], *, seed: int, n_quantiles: int,
                      say: Callable[[str], None], progress: bool) -> tuple[dict[int, dict], list[dict]]:
    """Label ``concepts`` at ``endpoint`` (`LabelerConfig` fields), then score the first
    ``settings.score_max_concepts`` labelled ones."""
    labels = label_concepts(concepts, LabelerConfig(n_examples=settings.n_examples, max_tokens=settings.max_tokens,
                                                    **endpoint), progress=progress)
    todo = [c for c in chosen if labels.get(c, {}).get("label")][: settings.score_max_concepts]
    to_score = {c: {"label": labels[c]["label"], **pools[c]} for c in todo}
    missing = unscored_rows(chosen, labels, len(to_score), settings.score_max_concepts)
    if not to_score:
        return labels, missing
    say(f"labels: scoring {len(to_score)} labels (detection and fuzzing)")
    t0 = time.perf_counter()
    scores = score_labels(to_score, LabelerConfig(max_tokens=settings.score_max_tokens, **endpoint),
                          n_activating=settings.score_n_activating, n_non_activating=settings.score_n_non_activating,
                          n_fuzzing=settings.score_n_fuzzing, sampling=settings.score_sampling,
                          n_quantiles=n_quantiles, examples_per_prompt=settings.score_examples_per_prompt,
                          seed=seed, progress=progress)
    say(f"labels: scored in {time.perf_counter() - t0:.1f}s; " + ", ".join(
        f"#{r['concept']} detection {r['detection_accuracy']} fuzzing {r['fuzzing_accuracy']}" for r in scores))
    return labels, scores + missing


def label_and_score(
    settings: LabelsConfig,
    top: pa.Table,
    vocab: pa.Table,
    order: Sequence[int],
    *,
    sampled: pa.Table | None = None,
    non_activating: pa.Table | None = None,
    seed: int = 0,
    n_quantiles: int = 5,
    cache_path: str | None = None,
    say: Callable[[str], None] | None = None,
    progress: bool = True,
) -> tuple[dict[int, dict], list[dict]]:
    """LLM labels for the most important concepts, then Delphi detection/fuzzing scores of the
    first ``settings.score_max_concepts`` labelled ones.

    Args:
        settings: the job's ``interpretation.labels`` section (`raylens.config.LabelsConfig`,
            or any object with its fields): endpoint (``base_url`` null starts a local
            ``transformers serve`` of ``serve_model`` on loopback, one request at a time;
            the API key is read from ``api_key_file`` or the environment variable ``api_key_env``,
            `raylens.llm.config.read_api_key`; retries as ``max_retries``/``backoff_s`` say), how many
            concepts to label and score, prompt and scoring sizes.
        top: ``concepts/top_examples.parquet`` (`example_from_row` columns plus ``concept``).
        vocab: ``concepts/vocabulary.parquet`` (``concept``, ``token``, ``direction``); the
            ``"promoted"`` tokens go into the label prompt.
        order: concept ids, most important first; the first ``settings.max_concepts`` are labelled.
        sampled: ``concepts/sampled_examples.parquet`` (same columns as ``top`` plus
            ``quantile``): weaker examples for ``example_sampling`` ``top+quantile`` /
            ``top+random``, and more unseen examples for scoring. None: none.
        non_activating: ``concepts/non_activating.parquet`` (``concept``, ``text``): the
            negatives of detection scoring. None: none (detection is then not scored).
        seed: the job seed (sampled-example choice and scoring draws).
        n_quantiles: activation bins of the scoring draw (``interpretation.sample_quantiles``).
        cache_path: the reply cache file (`raylens.llm.cache.ReplyCache`), None for none.
        say: receives one progress line per event (default: ``logging`` at INFO).
        progress: tqdm bars on stderr while labelling and scoring.

    Returns:
        ``(labels, scores)``: concept id -> `label_concepts` row for each labelled concept
        (empty when ``settings.enabled`` is false or ``order`` is empty), and the
        `score_labels` rows followed by `unscored_rows` for concepts that lost their label.

    Never raises for an endpoint problem (a local server that does not start included): the
    affected concepts get an error each, so the finished work is kept.
    """
    chosen = list(order[: settings.max_concepts])
    if not settings.enabled or not chosen:
        return {}, []
    say = say or log.info
    concepts, pools = _prepare(chosen, settings, top, vocab, sampled, non_activating, seed)
    run = dict(seed=seed, n_quantiles=n_quantiles, say=say, progress=progress)
    endpoint = dict(api_key=read_api_key(settings.api_key_env, settings.api_key_file), timeout_s=settings.timeout_s,
                    cache_path=cache_path, max_retries=settings.max_retries, backoff_s=settings.backoff_s,
                    max_backoff_s=settings.max_backoff_s)
    if settings.base_url:
        endpoint.update(base_url=settings.base_url, model=settings.model or settings.serve_model,
                        max_concurrency=settings.max_concurrency)
        return _label_then_score(chosen, concepts, pools, settings, endpoint, **run)
    from raylens.llm.server import LocalLLMServer

    say(f"labels: starting a local OpenAI-compatible server with {settings.serve_model} on loopback")
    try:
        server = LocalLLMServer(settings.serve_model).start()
    except Exception as e:  # keep the finished work: every concept records why it has no label
        err = f"the local LLM server ({settings.serve_model}) did not start: {type(e).__name__}: {e}"
        say("labels: " + err)
        labels = {c: {"label": None, "error": err, "prompt_hash": "", "cached": False} for c in chosen}
        return labels, unscored_rows(chosen, labels, 0, settings.score_max_concepts)
    try:
        # `transformers serve` generates one request at a time: queued requests would only time out.
        endpoint.update(base_url=server.base_url, model=settings.model or server.model_name, max_concurrency=1)
        return _label_then_score(chosen, concepts, pools, settings, endpoint, **run)
    finally:
        server.stop()

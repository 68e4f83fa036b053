"""Attributions over a corpus: what the attribution job runs inside each model-worker actor,
usable in a notebook too (no Ray here).

:func:`attribute_documents` explains a batch of documents with one or several methods and
returns one Arrow row per (document, method, target) (:data:`ROW_SCHEMA`), with the model's
prediction and, when asked, the row's faithfulness metrics. :func:`word_importance` and
:func:`method_summary` aggregate such rows across a corpus (any number of tables, streamed).

**Targets.** ``targets="predicted"`` (default) explains, for a classifier, the predicted class
(one clean forward per batch decides it, so every method explains the same class) and, for a
causal LM, the model's own greedy continuation (``max_new_tokens`` tokens, generated once per
document and passed to every method as token ids, recorded as ``prediction``).
``targets="column"`` takes the document's ``target`` value: a class index or class name
(classification) or the output text to explain (causal LM). ``targets="all_classes"``
(classification) explains every class, one row each. For a causal LM a row's target is the
whole output: its ``scores`` are ``(n_output_tokens, n_elements)``.

**Bad documents** do not stop a batch: an empty text, a text of more than ``max_tokens``
tokens (with ``too_long="error"``, the default; ``"truncate"`` cuts the text after its last
token that fits, leaving room for the output of a causal LM, and marks the row ``truncated``), a target that is not a class of the model (or an empty output text) gives one row per
method with ``error`` set and no scores; the other documents are explained as usual.

**Metrics** (``metrics=True``): :func:`raylens.attributions.metrics.faithfulness` over all the
rows of the batch at once (the unmasked, fully masked and random-ranking inputs of a document
are scored once for all its methods); each row gets deletion and insertion AUC, AOPC
comprehensiveness and sufficiency, and the same four for random rankings (``*_random``),
averaged over the row's targets (output tokens). Directions: deletion and sufficiency lower is
better, insertion and comprehensiveness higher is better.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raylens.attributions.methods import METHODS, method_class
from raylens.attributions.metrics import faithfulness
from raylens.attributions.output import AttributionOutput
from raylens.io.schemas import ATTRIBUTION_ROW_SCHEMA as ROW_SCHEMA
from raylens.io.schemas import METRIC_COLUMNS, SUMMARY_SCHEMA, WORDS_SCHEMA

TARGET_MODES = ("predicted", "column", "all_classes")
#: higher is better for these metrics; lower for the others
HIGHER_IS_BETTER = {"deletion_auc": False, "insertion_auc": True, "comprehensiveness": True, "sufficiency": False}




def build_explainers(lm: Any, methods: Sequence[str], *, params: Mapping[str, Mapping[str, Any]] | None = None,
                     **common: Any) -> dict[str, Any]:
    """One explainer per method name (``params[name]`` are that method's own options, ``common``
    the options of every method: granularity, batch_size, inference_mode, ...).

    Raises:
        ValueError: an unknown method name (the message lists the known ones) or a bad option.
    """
    params = dict(params or {})
    unknown = [m for m in list(methods) + list(params) if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method(s) {unknown}; available: {sorted(METHODS)}")
    return {m: method_class(m)(lm, **{**common, **dict(params.get(m) or {})}) for m in methods}


def _class_target(value: Any, id2label: Mapping[int, str]) -> int:
    """A column value as a class index: an int, an int-like string, or a class name."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    s = str(value).strip()
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    by_name = {str(v).lower(): int(k) for k, v in id2label.items()}
    if s.lower() in by_name:
        return by_name[s.lower()]
    raise ValueError(f"target {value!r} is neither a class index nor a class name {sorted(by_name)}")


@torch.no_grad()
def _classify(model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int,
              batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and its softmax probability per text (right padding, masked)."""
    dev = model.get_input_embeddings().weight.device
    preds, probs = [], []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(dev)
        p = torch.softmax(model(**enc).logits.float(), dim=-1)
        conf, cls = p.max(dim=-1)
        preds.append(cls.cpu().numpy())
        probs.append(conf.cpu().numpy())
    return np.concatenate(preds), np.concatenate(probs)


@torch.no_grad()
def _mean_logprob(model: torch.nn.Module, input_ids: list[int], target: list[int]) -> float:
    """Mean log-probability per token of ``target`` after ``input_ids`` (teacher forcing)."""
    dev = model.get_input_embeddings().weight.device
    ids = torch.tensor([input_ids + target[:-1]], device=dev)
    logits = model(input_ids=ids).logits[0, len(input_ids) - 1:].float()
    lp = torch.log_softmax(logits, dim=-1)[torch.arange(len(target)), torch.tensor(target, device=dev)]
    return float(lp.mean())


def _one_target(out: AttributionOutput, t: int) -> AttributionOutput:
    ts = None if out.target_scores is None else np.asarray(out.target_scores)[t:t + 1]
    return AttributionOutput(text=out.text, task=out.task, granularity=out.granularity, elements=out.elements,
                             element_spans=out.element_spans, element_tokens=out.element_tokens,
                             input_ids=out.input_ids, scores=out.scores[t:t + 1], targets=[out.targets[t]],
                             target_labels=[out.target_labels[t]], method=out.method, params=out.params,
                             target_scores=ts)


def _cut(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` up to the end of its last token that fits in ``max_tokens`` (special tokens included)."""
    enc = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens,
                    return_offsets_mapping=True, return_special_tokens_mask=True)
    ends = [e for (_, e), sp in zip(enc["offset_mapping"], enc["special_tokens_mask"]) if not sp]
    return text[: max(ends)] if ends else ""


def _error_row(doc_id: int, text: str, method: str, error: str, task: str, granularity: str) -> dict[str, Any]:
    row = {f.name: None for f in ROW_SCHEMA}
    row.update(doc_id=int(doc_id), target_index=0, text=text, method=method, error=error, task=task,
               granularity=granularity)
    return row


@dataclasses.dataclass
class _Documents:
    """The documents of one :func:`attribute_documents` call and what is known of each so far
    (lists indexed by position in the call)."""

    doc_ids: Sequence[int]
    texts: list[str]
    errors: list[str | None]
    targets: list[Any]
    truncated: list[bool]
    prediction: dict[int, str] = dataclasses.field(default_factory=dict)
    pred_score: dict[int, float] = dataclasses.field(default_factory=dict)

    def ok(self) -> list[int]:
        """Positions of the documents without an error."""
        return [i for i in range(len(self.texts)) if self.errors[i] is None]


def attribute_documents(
    lm: Any,
    explainers: Mapping[str, Any],
    doc_ids: Sequence[int],
    texts: Sequence[str | None],
    targets: Sequence[Any] | None = None,
    *,
    target_mode: str = "predicted",
    max_tokens: int = 512,
    too_long: str = "error",
    metrics: bool = True,
    metric_options: Mapping[str, Any] | None = None,
) -> tuple[pa.Table, dict[str, float]]:
    """Explain a batch of documents with every explainer.

    Args:
        lm: the :class:`~raylens.models.loading.LoadedModel` the explainers were built on.
        explainers: method name -> explainer (:func:`build_explainers`), all with the same
            granularity.
        doc_ids: ``n_docs`` document ids.
        texts: ``n_docs`` texts (None counts as empty).
        targets: ``n_docs`` column values, read when ``target_mode="column"``.
        target_mode: ``"predicted"``, ``"column"`` or ``"all_classes"`` (see the module docstring).
        max_tokens: longer documents (in tokens, special tokens included; for a causal LM, the
            input plus the output to explain) are recorded as errors, or cut (``too_long``).
        too_long: ``"error"`` or ``"truncate"``.
        metrics: compute the per-row faithfulness metrics.
        metric_options: options of :func:`~raylens.attributions.metrics.faithfulness`
            (``n_steps``, ``n_random``, ``batch_size``, ``seed``, ...).

    Returns:
        ``(table, seconds)``: the rows (:data:`ROW_SCHEMA`; explained rows in document order,
        then methods in ``explainers`` order, then targets) and the wall-clock seconds spent in
        each method (metrics under the key ``"metrics"``).

    Raises:
        ValueError: an unknown ``target_mode``, ``targets`` missing for ``"column"``, or lengths that
            do not match.
    """
    _check_call(explainers, doc_ids, texts, targets, target_mode, too_long)
    first = next(iter(explainers.values()))
    task = first.task
    if target_mode == "all_classes" and task != "sequence_classification":
        raise ValueError('target_mode="all_classes" is for classifiers')
    docs = _screen(lm, first, doc_ids, texts, targets, target_mode, max_tokens, too_long)
    if task == "sequence_classification":
        _classify_documents(lm, first, docs, target_mode)
    else:
        _generate_targets(lm, first, docs, target_mode, max_tokens)
    seconds: dict[str, float] = {}
    explained = _explain_documents(explainers, docs, task, seconds)
    per_row = _row_metrics(lm, [r[3] for r in explained], metrics, metric_options, seconds)
    source = "column" if target_mode == "column" else (
        "generated" if task == "causal_lm" else ("all_classes" if target_mode == "all_classes" else "predicted"))
    rows = _rows(docs, explainers, explained, per_row, seconds, source, task, first.granularity)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA), seconds


def _check_call(explainers: Mapping[str, Any], doc_ids: Sequence[int], texts: Sequence[str | None],
                targets: Sequence[Any] | None, target_mode: str, too_long: str) -> None:
    """The argument checks of :func:`attribute_documents` (raises ValueError)."""
    if target_mode not in TARGET_MODES:
        raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}")
    if too_long not in ("error", "truncate"):
        raise ValueError(f'too_long must be "error" or "truncate", got {too_long!r}')
    n = len(doc_ids)
    if len(texts) != n or (targets is not None and len(targets) != n):
        raise ValueError(f"doc_ids, texts and targets must have the same length ({n}, {len(texts)}, "
                         f"{None if targets is None else len(targets)})")
    if target_mode == "column" and targets is None:
        raise ValueError('target_mode="column" needs the targets column')
    if not explainers:
        raise ValueError("no attribution method given")


def _screen(lm: Any, first: Any, doc_ids: Sequence[int], texts: Sequence[str | None],
            targets: Sequence[Any] | None, target_mode: str, max_tokens: int, too_long: str) -> _Documents:
    """Input checks (empty, too long or cut, bad column target, what the explainer rejects): the
    documents with their errors and column targets."""
    tok, task = lm.tokenizer, first.task
    n = len(doc_ids)
    docs = _Documents(doc_ids=doc_ids, texts=["" if t is None else str(t) for t in texts], errors=[None] * n,
                      targets=[None] * n, truncated=[False] * n)
    texts = docs.texts
    lengths = [len(tok(t, add_special_tokens=True)["input_ids"]) if t.strip() else 0 for t in texts]
    if too_long == "truncate":
        room = max_tokens - (first.max_new_tokens if task == "causal_lm" else 0)
        for i, t in enumerate(texts):
            if lengths[i] > room:
                texts[i], lengths[i] = _cut(tok, t, room), room
                docs.truncated[i] = True
    id2label = _id2label(lm.model)
    for i, t in enumerate(texts):
        if not t.strip():
            docs.errors[i] = "empty text"
        elif lengths[i] > max_tokens:
            docs.errors[i] = f"too long: {lengths[i]} tokens > max_tokens={max_tokens}"
        elif target_mode == "column":
            try:
                docs.targets[i] = _column_target(targets[i], task, id2label)
            except ValueError as exc:
                docs.errors[i] = f"bad target: {exc}"
    ok = docs.ok()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = first.validate([texts[i] for i in ok], [docs.targets[i] for i in ok]) if ok else []
    for i, e in zip(ok, checks):
        if e is not None:
            docs.errors[i] = re.sub(r"^input \d+(: | )?", "", e)  # the index is the batch's, not the document's
    return docs


def _id2label(model: torch.nn.Module) -> dict[int, str]:
    return {int(k): v for k, v in (getattr(model.config, "id2label", None) or {}).items()}


def _column_target(value: Any, task: str, id2label: Mapping[int, str]) -> Any:
    """A target column value as a class index list (classifier) or an output text (causal LM)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError("missing target")
    if task == "sequence_classification":
        return [_class_target(value, id2label)]
    if not str(value):
        raise ValueError("empty target text")
    return str(value)


def _classify_documents(lm: Any, first: Any, docs: _Documents, target_mode: str) -> None:
    """A classifier's prediction for the good documents (one clean forward per batch), and the
    targets it decides."""
    ok = docs.ok()
    if not ok:
        return
    model = lm.model
    cls, prob = _classify(model, lm.tokenizer, [docs.texts[i] for i in ok], first.max_length, first.batch_size)
    n_classes = int(model.config.num_labels)
    id2label = _id2label(model)
    for i, c, p in zip(ok, cls, prob):
        docs.prediction[i] = str(id2label.get(int(c), int(c)))
        docs.pred_score[i] = float(p)
        if target_mode == "predicted":
            docs.targets[i] = [int(c)]
        elif target_mode == "all_classes":
            docs.targets[i] = list(range(n_classes))


def _generate_targets(lm: Any, first: Any, docs: _Documents, target_mode: str, max_tokens: int) -> None:
    """A causal LM's output to explain per good document (its greedy continuation, or the column's
    text as token ids), recorded as the prediction with its mean log-probability."""
    tok = lm.tokenizer
    for i in docs.ok():
        if target_mode != "column":
            try:
                docs.targets[i] = first.generate(docs.texts[i])[0]
            except ValueError as exc:
                docs.errors[i] = str(exc)
    for i in docs.ok():
        ids = tok(docs.texts[i], add_special_tokens=True)["input_ids"]
        if isinstance(docs.targets[i], str):
            docs.targets[i] = first.inputs.resolve_target(0, docs.texts[i], ids, docs.targets[i])
        tgt = docs.targets[i]
        if len(ids) + len(tgt) - 1 > max_tokens:
            docs.errors[i] = f"too long: {len(ids)} input + {len(tgt)} output tokens > max_tokens={max_tokens}"
            continue
        docs.prediction[i] = tok.decode(tgt)
        docs.pred_score[i] = _mean_logprob(lm.model, ids, tgt)


def _explain_documents(explainers: Mapping[str, Any], docs: _Documents, task: str,
                       seconds: dict[str, float]) -> list[tuple[int, str, int, AttributionOutput]]:
    """Every method over the good documents: ``(document position, method, target index, output)``
    per row (a classifier's output split per target); each method's time goes to ``seconds``."""
    ok = docs.ok()
    explained: list[tuple[int, str, int, AttributionOutput]] = []
    for name, explainer in explainers.items():
        t0 = time.perf_counter()
        outs = explainer([docs.texts[i] for i in ok], [docs.targets[i] for i in ok]) if ok else []
        seconds[name] = time.perf_counter() - t0
        for i, out in zip(ok, outs):
            if task == "sequence_classification":
                explained.extend((i, name, t, _one_target(out, t)) for t in range(out.n_targets))
            else:
                explained.append((i, name, 0, out))
    return explained


def _row_metrics(lm: Any, outputs: list[AttributionOutput], metrics: bool, metric_options: Mapping[str, Any] | None,
                 seconds: dict[str, float]) -> list[dict[str, float]]:
    """The faithfulness columns of each row (all rows scored at once; empty dicts when off)."""
    per_row: list[dict[str, float]] = [{} for _ in outputs]
    if not (metrics and outputs):
        return per_row
    t0 = time.perf_counter()
    res = faithfulness(lm, outputs, return_per_output=True, **dict(metric_options or {}))
    seconds["metrics"] = time.perf_counter() - t0
    po = res["per_output"]
    keys = {"deletion_auc": ("deletion", "auc", "random_auc"), "insertion_auc": ("insertion", "auc", "random_auc"),
            "comprehensiveness": ("comprehensiveness", "aopc", "random_aopc"),
            "sufficiency": ("sufficiency", "aopc", "random_aopc")}
    for j in range(len(outputs)):
        for col, (m, k, kr) in keys.items():
            per_row[j][col] = float(np.nanmean(po[m][j][k]))
            per_row[j][col + "_random"] = float(np.nanmean(po[m][j][kr]))
    return per_row


def _rows(docs: _Documents, explainers: Mapping[str, Any], explained: list[tuple[int, str, int, AttributionOutput]],
          per_row: list[dict[str, float]], seconds: Mapping[str, float], source: str, task: str,
          granularity: str) -> list[dict[str, Any]]:
    """The output rows: explained ones and one error row per method for each bad document, sorted
    by document, method (``explainers`` order) and target."""
    n_rows_by_method: dict[str, int] = defaultdict(int)
    for _, name, _, _ in explained:
        n_rows_by_method[name] += 1
    rows: list[dict[str, Any]] = []
    for j, (i, name, t, out) in enumerate(explained):
        row = out.to_arrow_row()
        row.update(doc_id=int(docs.doc_ids[i]), target_index=t, target_source=source,
                   prediction=docs.prediction.get(i), prediction_score=docs.pred_score.get(i), error=None,
                   truncated=docs.truncated[i], seconds=seconds[name] / max(1, n_rows_by_method[name]), **per_row[j])
        rows.append(row)
    for i, error in enumerate(docs.errors):
        if error is not None:
            rows.extend(_error_row(docs.doc_ids[i], docs.texts[i], name, error, task, granularity) for name in explainers)
    order = {name: k for k, name in enumerate(explainers)}
    rows.sort(key=lambda r: (r["doc_id"], order[r["method"]], r["target_index"]))
    return rows


# ----------------------------------------------------------------------------- corpus aggregates

_WORD_STRIP = re.compile(r"^\W+|\W+$", re.UNICODE)


def normalise_element(element: str) -> str:
    """The key an element is counted under across documents: lower case, surrounding
    punctuation and spaces (and byte-level BPE markers) removed."""
    return _WORD_STRIP.sub("", element.replace("\u0120", " ").replace("\u2581", " ").strip().lower())


def word_importance(tables: Iterable[pa.Table], *, min_count: int = 3, top_k: int = 25) -> pa.Table:
    """The words (elements) the model relies on across a corpus, per method and class.

    For every explained row (``error`` null), each element's score for the row's target (a
    causal LM's row: the mean over its output tokens) is added to its normalised word
    (:func:`normalise_element`) under ``(method, group)``; ``group`` is the explained class's
    label for a classifier and ``"all"`` for a causal LM.

    Args:
        tables: attribution rows (:data:`ROW_SCHEMA`), e.g. shard by shard.
        min_count: words seen fewer times in a group are left out (a mean over one or two
            occurrences ranks noise first).
        top_k: words kept per ``(method, group)`` and direction.

    Returns:
        A table with columns ``method``, ``group``, ``direction`` (``"positive"``: the highest mean
        scores, which push the target up; ``"negative"``: the lowest), ``rank`` (0-based),
        ``word``, ``mean_score`` (the mean of the element's score over its occurrences, in the
        method's units), ``count`` (occurrences) and ``n_docs`` (documents it occurs in).
    """
    acc: dict[tuple[str, str, str], list] = {}
    for table in tables:
        cols = table.select(["doc_id", "method", "task", "elements", "scores", "target_labels", "error"]).to_pylist()
        for r in cols:
            if r["error"] is not None or not r["elements"]:
                continue
            sc = np.asarray(r["scores"], dtype=np.float64).reshape(-1, len(r["elements"]))
            group = r["target_labels"][0] if r["task"] == "sequence_classification" else "all"
            per_el = sc.mean(axis=0)
            for el, s in zip(r["elements"], per_el):
                w = normalise_element(el)
                if not w or not np.isfinite(s):
                    continue
                a = acc.setdefault((r["method"], str(group), w), [0.0, 0, set()])
                a[0] += float(s)
                a[1] += 1
                a[2].add(r["doc_id"])
    by_group: dict[tuple[str, str], list[tuple[str, float, int, int]]] = defaultdict(list)
    for (method, group, w), (s, c, docs) in acc.items():
        if c >= min_count:
            by_group[(method, group)].append((w, s / c, c, len(docs)))
    out: dict[str, list] = {k: [] for k in ("method", "group", "direction", "rank", "word", "mean_score", "count",
                                            "n_docs")}
    for (method, group), words in sorted(by_group.items()):
        for direction, ranked in (("positive", sorted(words, key=lambda x: (-x[1], x[0]))),
                                  ("negative", sorted(words, key=lambda x: (x[1], x[0])))):
            for rank, (w, m, c, d) in enumerate(ranked[:top_k]):
                for k, v in zip(out, (method, group, direction, rank, w, m, c, d)):
                    out[k].append(v)
    return pa.Table.from_pydict(out, schema=WORDS_SCHEMA)


def method_summary(tables: Iterable[pa.Table], seconds: Mapping[str, float] | None = None) -> pa.Table:
    """One row per method: ``n_rows`` explained, ``n_docs``, ``n_errors`` (rows with an error), the
    mean of each faithfulness metric and of its random baseline over the explained rows
    (NaN when metrics were off), ``seconds`` (the method's compute time: ``seconds`` when given,
    else the sum of the rows' ``seconds``) and ``rows_per_second`` (explained rows / that time).
    """
    acc: dict[str, dict[str, Any]] = {}
    for table in tables:
        cols = ["doc_id", "method", "error", "seconds"] + list(METRIC_COLUMNS) + [m + "_random" for m in METRIC_COLUMNS]
        for r in table.select(cols).to_pylist():
            a = acc.setdefault(r["method"], {"docs": set(), "n_rows": 0, "n_errors": 0, "seconds": 0.0,
                                             "sums": defaultdict(float), "counts": defaultdict(int)})
            a["docs"].add(r["doc_id"])
            if r["error"] is not None:
                a["n_errors"] += 1
                continue
            a["n_rows"] += 1
            a["seconds"] += r["seconds"] or 0.0
            for m in list(METRIC_COLUMNS) + [m + "_random" for m in METRIC_COLUMNS]:
                if r[m] is not None and np.isfinite(r[m]):
                    a["sums"][m] += r[m]
                    a["counts"][m] += 1
    rows = []
    for method, a in acc.items():
        secs = float(seconds[method]) if seconds and method in seconds else a["seconds"]
        row = {"method": method, "n_rows": a["n_rows"], "n_docs": len(a["docs"]), "n_errors": a["n_errors"],
               "seconds": secs, "rows_per_second": a["n_rows"] / secs if secs > 0 else float("nan")}
        for m in list(METRIC_COLUMNS) + [m + "_random" for m in METRIC_COLUMNS]:
            row[m] = a["sums"][m] / a["counts"][m] if a["counts"][m] else float("nan")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


__all__ = ["HIGHER_IS_BETTER", "METRIC_COLUMNS", "ROW_SCHEMA", "TARGET_MODES", "attribute_documents",
           "build_explainers", "method_summary", "normalise_element", "word_importance"]

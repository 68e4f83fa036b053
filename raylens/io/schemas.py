"""The one schema of every artifact raylens writes (pyarrow), and only here.

Concept job: ``documents/`` (:data:`DOCUMENTS_SCHEMA`), ``activations/``
(:func:`activations_schema`), ``concepts/`` top examples, sampled examples, non-activating runs,
vocabulary, metrics, importance (two tables), label scores, and the concepts table. Attribution
job: its rows (:data:`ATTRIBUTION_ROW_SCHEMA`, the library's :data:`ATTRIBUTION_SCHEMA` plus the
job's columns), the per-method summary and the word table.

Activations are one ``activation`` column of :class:`ActivationType`: an Arrow extension type
(``raylens.activation``) over ``fixed_size_binary(d_model x bytes)``, one vector's raw
little-endian bytes per row, float16 (default), bfloat16 (the exact bits of a bf16 model) or
float32; the field's metadata also records ``dtype`` and ``d_model``. The layout was chosen by
measurement (``bench/activation_io.py``): with no compression, dictionary or statistics it is
written at about a quarter of a raw ``.npy`` file's speed and read faster than it (zero copy),
where ``fixed_shape_tensor`` with zstd, dictionary and statistics ran at 0.01x / 0.03x. Readers
without raylens see a plain ``fixed_size_binary`` column (pyarrow, pandas, polars, DuckDB: see
the README's "Reading activations").
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pyarrow as pa

#: storage dtype name -> bytes per value of an activation vector
ACTIVATION_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}

DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("label", pa.string()),
    ]
)


def _check_dtype(dtype: str) -> None:
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation dtype must be one of {sorted(ACTIVATION_DTYPES)}, got {dtype!r}")


class ActivationType(pa.ExtensionType):
    """Arrow extension type ``raylens.activation``: one ``(d_model,)`` vector per row stored as
    ``fixed_size_binary(d_model x bytes)`` in ``dtype`` (``"float16"``, ``"bfloat16"``,
    ``"float32"``), little-endian. Registered with pyarrow when this module is imported, so
    Parquet files read back with it; elsewhere the column is its ``fixed_size_binary`` storage.

    Raises:
        ValueError: unknown dtype or ``d_model < 1``.
    """

    def __init__(self, d_model: int, dtype: str = "float16"):
        _check_dtype(dtype)
        if int(d_model) < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.d_model, self.dtype = int(d_model), dtype
        super().__init__(pa.binary(self.d_model * ACTIVATION_DTYPES[dtype]), "raylens.activation")

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps({"d_model": self.d_model, "dtype": self.dtype}).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        p = json.loads(serialized.decode())
        return cls(p["d_model"], p["dtype"])

    def __reduce__(self):
        return ActivationType, (self.d_model, self.dtype)


with contextlib.suppress(pa.ArrowKeyError):  # registered once per process
    pa.register_extension_type(ActivationType(1))


def activations_schema(d_model: int, dtype: str = "float16") -> pa.Schema:
    """Schema of an activation shard: one row per unit (token, word, sentence or sample).

    Columns:
        doc_id (int64): the document (see ``DOCUMENTS_SCHEMA``).
        unit (int32): index of the unit within its document (0-based; with token sampling, the
            index among all the document's units, so kept rows keep their positions).
        char_start, char_end (int32): character span of the unit in the document text.
        token_start, token_end (int32): token span ``[start, end)`` the unit covers.
        text (string): the unit's text (the token, word or sentence).
        predicted_class (int32, nullable): the class the model predicts for the document,
            for a sequence classifier at granularity ``cls`` (one full forward gives both);
            null otherwise.
        activation (:class:`ActivationType` ``(d_model, dtype)``): the split-point activation of
            the unit, the mean over its tokens for coarser granularities; field metadata
            ``dtype`` and ``d_model``.

    Raises:
        ValueError: unknown dtype.
    """
    _check_dtype(dtype)
    return pa.schema(
        [
            pa.field("doc_id", pa.int64(), nullable=False),
            pa.field("unit", pa.int32()),
            pa.field("char_start", pa.int32()),
            pa.field("char_end", pa.int32()),
            pa.field("token_start", pa.int32()),
            pa.field("token_end", pa.int32()),
            pa.field("text", pa.string()),
            pa.field("predicted_class", pa.int32()),
            pa.field("activation", ActivationType(d_model, dtype),
                     metadata={"dtype": dtype, "d_model": str(int(d_model))}),
        ]
    )


def activation_parquet_options(schema: pa.Schema) -> dict:
    """Keyword arguments of ``pyarrow.parquet.ParquetWriter`` for a table with an ``activation``
    column: no compression, dictionary or statistics on it (zstd saves about 8% on activations
    and costs half the write speed; a dictionary or min/max of random bytes is useless), zstd,
    dictionaries and statistics on the other columns (``bench/activation_io.py``)."""
    others = [f.name for f in schema if f.name != "activation"]
    return {"compression": {**{n: "zstd" for n in others}, "activation": "none"},
            "use_dictionary": others, "write_statistics": others}


def activation_width(schema: pa.Schema) -> int:
    """``d_model`` of the ``activation`` column of ``schema`` (:class:`ActivationType`, its
    ``fixed_size_binary`` storage with field metadata, or round 1's ``fixed_shape_tensor``).

    Raises:
        ValueError: no ``activation`` column, or a plain binary one without ``d_model`` metadata.
    """
    return _activation_layout(schema)[0]


def activation_dtype(schema: pa.Schema) -> str:
    """Storage dtype name (``"float16"``, ``"bfloat16"``, ``"float32"``) of ``schema``'s
    ``activation`` column (see :func:`activation_width`)."""
    return _activation_layout(schema)[1]


def _activation_layout(schema: pa.Schema) -> tuple[int, str]:
    if "activation" not in schema.names:
        raise ValueError(f"no activation column in {schema.names}")
    field = schema.field("activation")
    t = field.type
    if isinstance(t, ActivationType):
        return t.d_model, t.dtype
    if isinstance(t, pa.FixedShapeTensorType):
        return int(t.shape[0]), "float16" if t.value_type == pa.float16() else "float32"
    meta = field.metadata or {}
    if b"d_model" in meta and b"dtype" in meta:
        return int(meta[b"d_model"]), meta[b"dtype"].decode()
    raise ValueError(f"activation column of type {t} has no dtype / d_model metadata")


def activation_array(values, dtype: str = "float16") -> pa.ExtensionArray:
    """A ``(n_rows, d_model)`` array as an :class:`ActivationType` column, zero-copy when the
    input already has the storage dtype.

    Args:
        values: numpy float array (cast to ``dtype``), or a torch tensor (``torch.bfloat16`` is
            stored bit for bit as ``"bfloat16"``; other tensors go through numpy).
        dtype: storage dtype; ``"bfloat16"`` from numpy float32 rounds to nearest even.

    Raises:
        ValueError: unknown dtype or values that are not 2-D.
    """
    _check_dtype(dtype)
    bits = _storage_bits(values, dtype)
    if bits.ndim != 2:
        raise ValueError(f"activations must be (n_rows, d_model), got shape {bits.shape}")
    t = ActivationType(bits.shape[1] * bits.itemsize // ACTIVATION_DTYPES[dtype], dtype)
    storage = pa.Array.from_buffers(t.storage_type, len(bits), [None, pa.py_buffer(bits)])
    return pa.ExtensionArray.from_storage(t, storage)


def _storage_bits(values, dtype: str) -> np.ndarray:
    """C-contiguous numpy array whose bytes are the stored values."""
    if type(values).__module__.startswith("torch"):
        import torch

        t = values.detach()
        if dtype == "bfloat16":
            return t.to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        values = t.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()
    if dtype == "bfloat16":
        x = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))  # round to nearest even
        return np.ascontiguousarray((rounded >> np.uint32(16)).astype(np.uint16))
    return np.ascontiguousarray(values, dtype=np.float16 if dtype == "float16" else np.float32)


def tensor_array(values: np.ndarray, dtype: str = "float16") -> pa.ExtensionArray:
    """A ``(n_rows, d)`` numpy array as a ``fixed_shape_tensor`` column of ``dtype``
    (``"float16"`` or ``"float32"``; the per-document importance vectors)."""
    values = np.ascontiguousarray(values, dtype=np.float16 if dtype == "float16" else np.float32)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(values)


def tensor_column_to_numpy(column: pa.Array | pa.ChunkedArray, dtype: str | None = None) -> np.ndarray:
    """A vector column as a ``(n_rows, d)`` numpy array, zero-copy for a single chunk.

    Decodes :class:`ActivationType` (float16 / float32 as is; bfloat16 as float32, exactly:
    the bf16 bits are the high half of a float32), ``fixed_shape_tensor`` columns (round 1's
    layout, :func:`tensor_array`) and plain ``fixed_size_binary`` activation columns read
    without raylens' extension type when ``dtype`` is given (see :func:`activation_dtype`).

    Raises:
        ValueError: a plain binary column without ``dtype``, or an unknown column type.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    t = column.type
    if isinstance(t, pa.FixedShapeTensorType):
        if not chunks:
            return np.zeros((0,) + tuple(t.shape), dtype=t.value_type.to_pandas_dtype())
        return np.concatenate([c.to_numpy_ndarray() for c in chunks]) if len(chunks) > 1 \
            else chunks[0].to_numpy_ndarray()
    if isinstance(t, ActivationType):
        dtype, chunks = t.dtype, [c.storage for c in chunks]
    elif not (pa.types.is_fixed_size_binary(t) and dtype is not None):
        raise ValueError(f"cannot decode a column of type {t} as activations"
                         + (" without dtype" if pa.types.is_fixed_size_binary(t) else ""))
    _check_dtype(dtype)
    width = t.storage_type.byte_width if isinstance(t, ActivationType) else t.byte_width
    itemsize = ACTIVATION_DTYPES[dtype]
    d = width // itemsize
    raw = np.uint16 if dtype == "bfloat16" else np.dtype(np.float16 if dtype == "float16" else np.float32)
    parts = [np.frombuffer(c.buffers()[1], raw, count=len(c) * d, offset=c.offset * width).reshape(-1, d)
             if len(c) else np.zeros((0, d), raw) for c in chunks]
    out = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else np.zeros((0, d), raw))
    if dtype == "bfloat16":
        return (out.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return out


# ---- concept job: concepts/*.parquet ---------------------------------------------------------
TOP_EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("concept", pa.int32()),
        pa.field("rank", pa.int32()),
        pa.field("activation", pa.float32()),
        pa.field("doc_id", pa.int64()),
        pa.field("unit", pa.int32()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("context", pa.string()),
        pa.field("span_start", pa.int32()),
        pa.field("span_end", pa.int32()),
    ]
)
#: `top_examples_table` of a `quantile_sample`: the top-example columns plus the activation bin.
SAMPLED_EXAMPLES_SCHEMA = TOP_EXAMPLES_SCHEMA.append(pa.field("quantile", pa.int32()))


NON_ACTIVATING_SCHEMA = pa.schema(
    [
        pa.field("concept", pa.int32()),
        pa.field("doc_id", pa.int64()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
        pa.field("text", pa.string()),
    ]
)


VOCAB_SCHEMA = pa.schema(
    [
        pa.field("concept", pa.int32()),
        pa.field("direction", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("token_id", pa.int64()),
        pa.field("token", pa.string()),
        pa.field("score", pa.float32()),
    ]
)


SCORES_SCHEMA = pa.schema(
    [pa.field("concept", pa.string()), pa.field("label", pa.string())]
    + [pa.field(f"{task}_{name}", pa.float64()) for task in ("detection", "fuzzing")
       for name in ("accuracy", "balanced_accuracy")]
    + [pa.field(f"{task}_{name}", pa.int32()) for task in ("detection", "fuzzing")
       for name in ("tp", "fp", "tn", "fn", "n_examples", "n_errors")]
    + [pa.field("n_examples", pa.int32()), pa.field("n_errors", pa.int32()), pa.field("n_cached", pa.int32()),
       pa.field("error", pa.string())]
)


#: ``concepts/concepts.parquet``: one row per concept
CONCEPTS_SCHEMA = pa.schema([
    pa.field("concept", pa.int32()),
    pa.field("label", pa.string()),
    pa.field("label_error", pa.string()),
    pa.field("importance", pa.float32()),
    pa.field("importance_x_activation", pa.float32()),
    pa.field("frequency", pa.float32()),
    pa.field("top_tokens", pa.list_(pa.string())),
    pa.field("bottom_tokens", pa.list_(pa.string())),
    pa.field("detection_accuracy", pa.float32()),
    pa.field("fuzzing_accuracy", pa.float32()),
    pa.field("label_score_error", pa.string()),
])

#: ``concepts/metrics.parquet``: reconstruction metrics of the fitted model per split
#: (`raylens.concepts.metrics.reconstruction_metrics`), with the fit's seconds
METRICS_SCHEMA = pa.schema(
    [pa.field("model", pa.string()), pa.field("split", pa.string())]
    + [pa.field(name, pa.float64()) for name in ("mse", "explained_variance", "mean_l0", "sparsity_ratio",
                                                  "dead_fraction", "fid")]
    + [pa.field("fid_rows", pa.int64()), pa.field("n_rows", pa.int64()), pa.field("fit_seconds", pa.float64())]
)

#: ``concepts/importance.parquet``: per concept, the mean concept-to-output gradient and concept x
#: gradient over ``n_samples`` documents
IMPORTANCE_SCHEMA = pa.schema(
    [
        pa.field("concept", pa.int32()),
        pa.field("gradient", pa.float32()),
        pa.field("concept_x_gradient", pa.float32()),
        pa.field("n_samples", pa.int32()),
    ]
)


def importance_per_doc_schema(nb_concepts: int) -> pa.Schema:
    """``concepts/importance_per_doc.parquet``: per document, its output ``target`` and the
    ``(nb_concepts,)`` float32 gradient and concept x gradient vectors."""
    vector = pa.fixed_shape_tensor(pa.float32(), [nb_concepts])
    return pa.schema([pa.field("doc_id", pa.int64()), pa.field("target", pa.int64()),
                      pa.field("gradient", vector), pa.field("concept_x_gradient", vector)])


# ---- attribution job -------------------------------------------------------------------------
#: one explanation (`raylens.attributions.output.AttributionOutput.to_arrow_row`)
ATTRIBUTION_SCHEMA = pa.schema([
    pa.field("text", pa.string()),
    pa.field("task", pa.string()),
    pa.field("granularity", pa.string()),
    pa.field("elements", pa.list_(pa.string())),
    pa.field("element_spans", pa.list_(pa.list_(pa.int32(), 2))),
    pa.field("element_tokens", pa.list_(pa.list_(pa.int32()))),  # token positions per element
    pa.field("input_ids", pa.list_(pa.int64())),  # the prompt's token ids, special tokens included
    pa.field("scores", pa.list_(pa.list_(pa.float32()))),  # (n_targets, n_elements), ragged across rows
    pa.field("targets", pa.list_(pa.int64())),
    pa.field("target_labels", pa.list_(pa.string())),
    pa.field("method", pa.string()),
    pa.field("params", pa.string()),  # JSON
    pa.field("target_scores", pa.list_(pa.float32())),
])


#: the per-row faithfulness metrics of the attribution job (each also with a ``_random`` baseline)
METRIC_COLUMNS = ("deletion_auc", "insertion_auc", "comprehensiveness", "sufficiency")

#: ``attributions/shard-*.parquet``: one row per (document, method, target)
ATTRIBUTION_ROW_SCHEMA = pa.schema(
    [pa.field("doc_id", pa.int64(), nullable=False), pa.field("target_index", pa.int32())]
    + list(ATTRIBUTION_SCHEMA)
    + [
        pa.field("target_source", pa.string()),  # predicted | column | generated | all_classes
        pa.field("prediction", pa.string()),  # predicted class label, or the generated text
        pa.field("prediction_score", pa.float64()),  # softmax prob. of the class / mean log-prob. per output token
        pa.field("error", pa.string()),  # null when the row was explained
        pa.field("truncated", pa.bool_()),  # the text was cut to max_tokens (too_long="truncate")
        pa.field("seconds", pa.float64()),  # the method's time for the batch, shared equally by its rows
    ]
    + [pa.field(m, pa.float64()) for m in METRIC_COLUMNS]
    + [pa.field(m + "_random", pa.float64()) for m in METRIC_COLUMNS]
)

#: ``summary.parquet``: one row per method (`raylens.attributions.corpus.method_summary`)
SUMMARY_SCHEMA = pa.schema(
    [pa.field("method", pa.string()), pa.field("n_rows", pa.int64()), pa.field("n_docs", pa.int64()),
     pa.field("n_errors", pa.int64()), pa.field("seconds", pa.float64()), pa.field("rows_per_second", pa.float64())]
    + [pa.field(m, pa.float64()) for m in METRIC_COLUMNS]
    + [pa.field(m + "_random", pa.float64()) for m in METRIC_COLUMNS]
)

#: ``words.parquet``: per method and class (``group``), the highest and lowest mean-attribution words
WORDS_SCHEMA = pa.schema(
    [
        pa.field("method", pa.string()),
        pa.field("group", pa.string()),
        pa.field("direction", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("word", pa.string()),
        pa.field("mean_score", pa.float64()),
        pa.field("count", pa.int64()),
        pa.field("n_docs", pa.int64()),
    ]
)


# ---- both jobs -------------------------------------------------------------------------------
#: ``issues.parquet``: one row per problem with one document (the job went on): ``stage``
#: (``extract``, ``attribute``), ``kind`` (``empty``, ``truncated``, ``float16_overflow``,
#: ``too_long``, ``error``) and the message
ISSUES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64()),
        pa.field("stage", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("message", pa.string()),
    ]
)


def issues_table(issues: list[dict]) -> pa.Table:
    """:data:`ISSUES_SCHEMA` rows from issue dicts (``doc_id``, ``stage``, ``kind``, and the
    message as ``message`` or ``error``), sorted by document then stage."""
    rows = sorted(({"doc_id": int(i["doc_id"]), "stage": i.get("stage"), "kind": i.get("kind", "error"),
                    "message": i.get("message", i.get("error"))} for i in issues),
                  key=lambda r: (r["doc_id"], r["stage"] or ""))
    return pa.Table.from_pylist(rows, schema=ISSUES_SCHEMA)



# ---- network job: lenses and causal head gating (raylens.network.corpus) ---------------------
#: ``lens/shard-*.parquet``: one row per (document, lens, layer, position). ``layer`` 0 is the
#: embedding output, ``n_layers`` the model's output. ``kl_to_final`` in nats (KL(final || layer));
#: ranks are 0-based (0: the layer's own top-1), the number of tokens with a strictly higher logit.
#: ``next_token_id`` and ``rank_next`` are null at a document's last position.
LENS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("lens", pa.string()),
        pa.field("layer", pa.int32()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("next_token_id", pa.int32()),
        pa.field("kl_to_final", pa.float32()),
        pa.field("top1_token_id", pa.int32()),
        pa.field("top1_agrees", pa.bool_()),
        pa.field("rank_final", pa.int32()),
        pa.field("rank_next", pa.int32()),
    ]
)

#: per (document, lens, position): the first layer from which the lens's top-1 stays the
#: model's final top-1 (``n_layers`` when only the output agrees)
PREDICTION_DEPTH_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("lens", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("final_top1_token_id", pa.int32()),
        pa.field("prediction_depth", pa.int32()),
    ]
)

#: quantile levels of the KL columns of :data:`LENS_CURVES_SCHEMA`
LENS_KL_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)

#: per (lens, layer) over a corpus: KL quantiles (nats), top-1 agreement rate with the final
#: top-1, mean 0-based ranks of the final top-1 and of the actual next token, token counts
LENS_CURVES_SCHEMA = pa.schema(
    [pa.field("lens", pa.string()), pa.field("layer", pa.int32())]
    + [pa.field(f"kl_q{round(q * 100):02d}", pa.float32()) for q in LENS_KL_QUANTILES]
    + [
        pa.field("kl_mean", pa.float32()),
        pa.field("top1_agreement", pa.float32()),
        pa.field("mean_rank_final", pa.float32()),
        pa.field("mean_rank_next", pa.float32()),
        pa.field("n_tokens", pa.int64()),
    ]
)

#: causal head gating roles (`raylens.network.heads.HEAD_ROLES`)
HEAD_ROLE_NAMES = ("facilitating", "interfering", "irrelevant")

#: per (seed, layer, head): the gates of the three fits in [0, 1] (``gate`` unregularised,
#: ``gate_retain`` with the regulariser that rewards open gates, ``gate_remove`` with the one
#: that rewards closed gates), the role they give, and each fit's final task loss (nats/token)
HEAD_GATING_SCHEMA = pa.schema(
    [
        pa.field("seed", pa.int32()),
        pa.field("layer", pa.int32()),
        pa.field("head", pa.int32()),
        pa.field("gate", pa.float32()),
        pa.field("gate_retain", pa.float32()),
        pa.field("gate_remove", pa.float32()),
        pa.field("role", pa.string()),
        pa.field("loss", pa.float32()),
        pa.field("loss_retain", pa.float32()),
        pa.field("loss_remove", pa.float32()),
    ]
)

#: per (layer, head) over seeds: the majority role, the share of seeds that give it, and the
#: mean gates
HEAD_ROLE_STABILITY_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int32()),
        pa.field("head", pa.int32()),
        pa.field("role", pa.string()),
        pa.field("agreement", pa.float32()),
        pa.field("n_seeds", pa.int32()),
        pa.field("n_facilitating", pa.int32()),
        pa.field("n_interfering", pa.int32()),
        pa.field("n_irrelevant", pa.int32()),
        pa.field("mean_gate_retain", pa.float32()),
        pa.field("mean_gate_remove", pa.float32()),
    ]
)

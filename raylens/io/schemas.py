"""The one schema of every artifact raylens writes (pyarrow).

Activations are ``arrow.fixed_shape_tensor`` columns of shape ``(d_model,)`` (float16 by
default, float32 on request), never Python lists of floats. Arrow has no bfloat16:
bfloat16 activations are cast to float16 (documented loss of range, not of the
mantissa bits that float16 holds) or to float32.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ACTIVATION_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}

DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("label", pa.string()),
    ]
)


def activations_schema(d_model: int, dtype: str = "float16") -> pa.Schema:
    """Schema of an activation shard: one row per unit (token, word, sentence or sample).

    Columns:
        doc_id (int64): the document (see ``DOCUMENTS_SCHEMA``).
        unit (int32): index of the unit within its document (0-based).
        char_start, char_end (int32): character span of the unit in the document text.
        token_start, token_end (int32): token span ``[start, end)`` the unit covers.
        text (string): the unit's text (the token, word or sentence).
        predicted_class (int32, nullable): the class the model predicts for the document,
            for a sequence classifier at granularity ``cls`` (one full forward gives both);
            null otherwise.
        activation (fixed_shape_tensor<dtype>[d_model]): the split-point activation of the
            unit, the mean over its tokens for coarser granularities.
    """
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation dtype must be one of {sorted(ACTIVATION_DTYPES)}, got {dtype!r}")
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
            pa.field("activation", pa.fixed_shape_tensor(ACTIVATION_DTYPES[dtype], [d_model])),
        ]
    )


def tensor_array(values: np.ndarray, dtype: str = "float16") -> pa.ExtensionArray:
    """A ``(n_rows, d)`` numpy array as a fixed-shape tensor column of ``dtype``."""
    values = np.ascontiguousarray(values, dtype=np.float16 if dtype == "float16" else np.float32)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(values)


def tensor_column_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of :func:`tensor_array`: a ``(n_rows, d)`` numpy array."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros((0,) + tuple(column.type.shape), dtype=column.type.value_type.to_pandas_dtype())
        return np.concatenate([c.to_numpy_ndarray() for c in column.chunks])
    return column.to_numpy_ndarray()


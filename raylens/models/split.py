"""Split a model at a layer and read activations there, at a chosen granularity.

The split point is a module of the model (a layer index picks the i-th block of its
layer stack, or give a dotted module path). Activations are read with nnsight, and the
forward stops right after the split module (``tracer.stop()``), so layers past the
split cost nothing. Batches are right-padded: with a causal mask real tokens never see
the pads, and encoders mask them, so batch size 1 and batch size N give the same numbers.

Granularities (one activation row per *unit*; coarser units average their tokens):

* ``token``: every non-special token;
* ``word``: words from the regex ``\\w+(?:['’]\\w+)*|[^\\w\\s]`` (a token belongs to the
  word holding its first non-space character);
* ``sentence``: spans split after ``.``, ``!`` or ``?`` followed by whitespace;
* ``sample_mean``: one row per document, the mean over its non-special tokens;
* ``cls``: one row per document, the first token when the tokenizer adds a CLS token
  (encoders), else the last token (decoders: the only one that sees the whole text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import activations_schema
from raylens.models.extraction import (FLOAT16_MAX, GRANULARITIES, WindowTokens, WindowUnits,  # noqa: F401 (re-exported)
                                       csr, float16_overflow_issues, iter_windows, pool_documents, tokenize)
from raylens.models.loading import LoadedModel, load_model, meta_model
from raylens.text import TEXT_UNITS, group_tokens

log = logging.getLogger(__name__)


def layer_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of transformer blocks: the longest ``ModuleList`` whose length equals
    ``config.num_hidden_layers`` (``model.layers`` for Llama, ``encoder.layer`` for BERT...).

    Raises:
        ValueError: no such list exists.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the layer stack of {type(model).__name__}; give split_point as a module path")
    return best


def resolve_split_point(model: torch.nn.Module, split_point: int | str) -> str:
    """Dotted module path of the split point.

    Args:
        split_point: a layer index into :func:`layer_stack` (negative counts from the end), or
            a module path such as ``"model.layers.5"``.

    Raises:
        ValueError: the index is out of range or the path names no module (with close matches).
    """
    if isinstance(split_point, int) or (isinstance(split_point, str) and split_point.lstrip("-").isdigit()):
        idx = int(split_point)
        name, layers = layer_stack(model)
        if not -len(layers) <= idx < len(layers):
            raise ValueError(f"split_point {idx} is out of range: the model has {len(layers)} layers ({name})")
        return f"{name}.{idx % len(layers)}"
    modules = dict(model.named_modules())
    if split_point not in modules:
        close = difflib.get_close_matches(split_point, list(modules), n=3)
        raise ValueError(f"split_point {split_point!r} is not a module of {type(model).__name__}; close: {close}")
    return split_point


def block_index(model: torch.nn.Module, module_path: str) -> int | None:
    """The index in :func:`layer_stack` of the block holding ``module_path`` (the block itself or
    a module inside it), or ``None`` for a module outside the stack (embeddings, final norm)."""
    stack, _ = layer_stack(model)
    rest = module_path[len(stack) + 1:].split(".")[0] if module_path.startswith(stack + ".") else ""
    return int(rest) if rest.isdigit() else None


def load_split_model(name_or_path: str, split_point: int | str, *, task: str | None = None,
                     dtype: str = "float32", device: str | None = None, device_map: str | dict | None = None,
                     truncate: bool = True, trust_remote_code: bool = False) -> "SplitModel":
    """Load a model for activations at ``split_point`` and split it there.

    With ``truncate`` (the default) and a split point inside the layer stack, only the embeddings
    and the blocks up to the split are loaded, as the bare model without its head: the
    activations are the same as the full model's at the split (blocks only see the blocks below
    them), and a mid-model split loads about half the weights (Llama-3.1-8B at layer 16: 7.9 of
    15 GiB). Use ``truncate=False`` when the model's output is needed too (importance, a
    classifier's predicted class at granularity ``cls``). ``trust_remote_code``: as
    `raylens.models.loading.load_model`.

    Raises:
        ValueError: bad split point (checked on the meta-device skeleton, before any weight is read).
        FileNotFoundError: unknown model.
    """
    skeleton, _ = meta_model(name_or_path, task, trust_remote_code=trust_remote_code)
    path = resolve_split_point(skeleton, split_point)
    index = block_index(skeleton, path)
    if not truncate or index is None:
        loaded = load_model(name_or_path, task=task, dtype=dtype, device=device, device_map=device_map,
                            trust_remote_code=trust_remote_code)
        return SplitModel(loaded, path)
    loaded = load_model(name_or_path, task=task, dtype=dtype, device=device, device_map=device_map,
                        num_layers=index + 1, trust_remote_code=trust_remote_code)
    base = f"{skeleton.base_model_prefix}."
    inner = path[len(base):] if path.startswith(base) and skeleton.base_model is not skeleton else path
    return SplitModel(loaded, inner)


@dataclasses.dataclass
class Encoded:
    """One tokenised document. ``offsets`` is ``(n_tokens, 2)`` character spans."""

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[int]
    truncated: bool


@dataclasses.dataclass
class Unit:
    """A unit of a document: its character span, text and token positions."""

    char_start: int
    char_end: int
    text: str
    tokens: list[int]


class SplitModel:
    """A model split at ``split_point``: activations in, activations out.

    Args:
        loaded: the model and tokenizer (:func:`raylens.models.load_model`).
        split_point: layer index or module path (see :func:`resolve_split_point`).

    Raises:
        ValueError: bad split point.
    """

    def __init__(self, loaded: LoadedModel, split_point: int | str):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.module_path = resolve_split_point(self.model, split_point)
        self.module = dict(self.model.named_modules())[self.module_path]
        self.d_model = int(self.model.config.hidden_size)
        self._nn = None

    # ---- tokenisation ------------------------------------------------------------
    def encode(self, texts: Sequence[str], max_tokens: int) -> list[Encoded]:
        """Tokenise each text alone (no padding), once, with character offsets, truncated to
        ``max_tokens`` (``truncated`` from the fast tokenizer's overflow, else a second pass)."""
        enc, truncated = tokenize(self.tokenizer, texts, max_tokens)
        return [
            Encoded(list(ids), [tuple(o) for o in offs], list(sp), t)
            for ids, offs, sp, t in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], truncated)
        ]

    def pad(self, encoded: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to ``(n_samples, n_tokens)`` input ids and attention mask on the model device."""
        n = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), n), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), n), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        dev = self.loaded.device
        return ids.to(dev), mask.to(dev)

    # ---- activations -------------------------------------------------------------
    def _nnsight(self):
        if self._nn is None:
            import nnsight

            self._nn = nnsight.NNsight(self.model)
        return self._nn

    def _envoy(self):
        env = self._nnsight()
        for part in self.module_path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Split-point activations ``(n_samples, n_tokens, d_model)``; the forward stops after the split."""
        from raylens.models._trace import trace_split_output

        out = trace_split_output(self._nnsight(), self._envoy(), input_ids, attention_mask)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def hidden_and_prediction(self, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split-point activations and the predicted class (argmax of the logits) of a sequence
        classifier, from one full forward (a hook on the split module reads its output)."""
        seen: dict[str, torch.Tensor] = {}

        def capture(h: torch.Tensor) -> torch.Tensor:
            seen["h"] = h
            return h

        with self.replace_output(capture):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return seen["h"], logits.argmax(-1)

    @contextlib.contextmanager
    def replace_output(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Within the block, the split module's output ``h`` of shape ``(n_samples, n_tokens,
        d_model)`` is replaced by ``fn(h)`` for the rest of the forward (used for gradients
        through concept space, where nnsight's deferred graph is not needed)."""

        def hook(_mod, _inp, out):
            if isinstance(out, tuple):
                return (fn(out[0]),) + tuple(out[1:])
            return fn(out)

        handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ---- units -------------------------------------------------------------------
    def units(self, text: str, enc: Encoded, granularity: str, exclude_first_tokens: int = 0) -> list[Unit]:
        """The units of one document at ``granularity`` with their token positions; token
        positions below ``exclude_first_tokens`` and special tokens are left out. The plain,
        one-document statement of the rules that extraction applies to whole windows as arrays
        (:func:`raylens.models.extraction.window_units`; tests check that the two agree)."""
        keep = [i for i, (sp, (s, e)) in enumerate(zip(enc.special, enc.offsets))
                if not sp and e > s and i >= exclude_first_tokens]
        if granularity == "cls":
            if not enc.input_ids:
                return []
            first_is_cls = self.tokenizer.cls_token_id is not None and enc.input_ids[0] == self.tokenizer.cls_token_id
            pos = 0 if first_is_cls else len(enc.input_ids) - 1
            end = enc.offsets[keep[-1]][1] if keep else 0
            return [Unit(0, end, text[:end], [pos])]
        if not keep:
            return []
        if granularity == "token":
            return [Unit(enc.offsets[i][0], enc.offsets[i][1], text[enc.offsets[i][0]: enc.offsets[i][1]], [i])
                    for i in keep]
        if granularity == "sample_mean":
            end = enc.offsets[keep[-1]][1]
            return [Unit(0, end, text[:end], keep)]
        if granularity not in TEXT_UNITS:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        return [Unit(s, e, text[s:e], tokens) for s, e, tokens in group_tokens(text, enc.offsets, keep, granularity)]

    def extract(self, texts: Sequence[str], doc_ids: Sequence[int], *, granularity: str = "token",
                batch_size: int = 8, max_tokens: int = 128, dtype: str = "float16", exclude_first_tokens: int = 0,
                sampling: RowSampling | None = None, progress: Callable[[int], None] | None = None,
                ) -> tuple[pa.Table, list[dict]]:
        """Activations of a list of documents at the split point, as one table (all of
        :meth:`iter_extract`'s windows; for bounded memory stream those instead).

        Returns:
            ``(table, issues)``: the activation table (schema :func:`raylens.io.schemas.activations_schema`,
            ordered by ``doc_id`` then ``unit``) and the issues (see :meth:`iter_extract`).

        Raises:
            ValueError: unknown granularity, or ``texts`` and ``doc_ids`` of different lengths.
        """
        tables, issues = [], []
        for table, found in self.iter_extract(texts, doc_ids, granularity=granularity, batch_size=batch_size,
                                              max_tokens=max_tokens, dtype=dtype, sampling=sampling,
                                              exclude_first_tokens=exclude_first_tokens, progress=progress):
            tables.append(table)
            issues += found
        if not tables:
            schema = activations_schema(self.d_model, dtype)
            return schema.empty_table(), issues
        return (pa.concat_tables(tables) if len(tables) > 1 else tables[0]), issues

    def iter_extract(self, texts: Sequence[str], doc_ids: Sequence[int], *, granularity: str = "token",
                     batch_size: int = 8, max_tokens: int = 128, dtype: str = "float16", exclude_first_tokens: int = 0,
                     window_rows: int | None = None, sampling: RowSampling | None = None,
                     progress: Callable[[int], None] | None = None) -> Iterator[tuple[pa.Table, list[dict]]]:
        """Activations of a list of documents, streamed in windows of whole documents (in
        ``doc_id`` order) of at most ``window_rows`` rows each, so the host holds one window's
        tokens, units and rows at a time.

        Each text is tokenised once. Within a window documents are batched by length (right
        padding, see the module docstring), and the units are gathered and mean-pooled on the
        model's device with one ``index_select`` (and one ``index_add_`` when units hold several
        tokens) per batch; only the stored values (2 or 4 bytes per value) cross to the host. The
        units and the other columns are built as arrays, not per row
        (:mod:`raylens.models.extraction`, where this runs).

        Args:
            texts: ``n_docs`` strings.
            doc_ids: their ids (int64).
            granularity: one of :data:`GRANULARITIES`.
            batch_size: documents per forward pass (sorted by length to cut padding).
            max_tokens: longer documents are truncated (recorded in the errors list as a note).
            dtype: storage of the activations: ``"float16"``, ``"bfloat16"`` (a bf16 model's
                token activations bit for bit; means rounded to nearest even) or ``"float32"``.
            exclude_first_tokens: leave out token positions below this (special tokens are
                always left out). Decoders without a BOS token turn their first position into
                an attention sink: in SmolLM2 its activation norm is about 100x the others and
                it carries 98% of the activation variance at layer 15, so the job drops it by
                default (``extraction.exclude_first_tokens: 1``).
            window_rows: rows per window, at most: a window holds ``window_rows // max_tokens``
                documents (at least one; ``None`` = one window for all), tokenised when it starts.
            sampling: keep a seeded subset of each document's units (:class:`RowSampling`).
            progress: called with the number of documents done after each batch.

        Yields:
            ``(table, issues)`` per window: its activation table (schema
            :func:`raylens.io.schemas.activations_schema`, ordered by ``doc_id`` then ``unit``;
            ``predicted_class`` set for a sequence classifier at granularity ``cls``, whose forward
            then runs to the end, null otherwise) and one dict ``{doc_id, stage, kind, error}`` per
            empty, truncated or float16-overflowing document of the window (``kind``: ``empty``,
            ``truncated``, ``float16_overflow``; empty ones produce no rows).

        Raises:
            ValueError: unknown granularity, or ``texts`` and ``doc_ids`` of different lengths.
        """
        return iter_windows(self, texts, doc_ids, granularity=granularity, batch_size=batch_size,
                            max_tokens=max_tokens, dtype=dtype, exclude_first_tokens=exclude_first_tokens,
                            window_rows=window_rows, sampling=sampling, progress=progress)

    def pooled_activations(self, encoded: Sequence[Encoded], tokens: Sequence[Sequence[Sequence[int]]], *,
                           batch_size: int, predict: bool = False, progress: Callable[[int], None] | None = None,
                           dtype: str = "float32") -> tuple[torch.Tensor, list[int | None]]:
        """Mean split-point activation of every unit, documents batched by length, pooled on the
        model's device.

        Args:
            encoded: ``n_docs`` tokenised documents.
            tokens: per document, the token positions of each of its units.
            dtype: the values' dtype (``"float16"``, ``"bfloat16"``, ``"float32"``): each batch is
                pooled in float32 and cast once (round to nearest even), so a window holds its
                rows in the stored dtype only (a float16 overflow is ``inf`` there).

        Returns:
            ``(values, predicted)``: ``(n_units, d_model)`` of ``dtype`` on the model's device,
            units in document then unit order; per document its predicted class when ``predict``
            (a sequence classifier's full forward), else ``None``.
        """
        chain = itertools.chain.from_iterable
        start = csr([len(e.input_ids) for e in encoded])
        window = WindowTokens(np.fromiter(chain(e.input_ids for e in encoded), np.int64, int(start[-1])),
                              np.zeros((int(start[-1]), 2), np.int64), np.zeros(int(start[-1]), bool), start,
                              np.zeros(len(encoded), bool))
        units = [u for doc in tokens for u in doc]
        sizes = np.asarray([len(u) for u in units], np.int64)
        no_span = np.zeros(len(units), np.int64)  # pooling reads only the token positions
        unit_index = WindowUnits(csr([len(t) for t in tokens]), no_span, no_span, no_span, no_span, no_span,
                                 csr(sizes), np.fromiter(chain(units), np.int64, int(sizes.sum())))
        values, predicted = pool_documents(self, window, unit_index, np.arange(len(encoded)), batch_size=batch_size,
                                           predict=predict, progress=progress, dtype=dtype)
        return values, ([None] * len(encoded) if predicted is None else [int(p) for p in predicted])


#: The byte budget over a window's rows, in quarters: the window being computed (pooled batch by
#: batch straight into the stored dtype, :func:`raylens.models.extraction.pool_documents`, with its
#: unit arrays); the window before it, being written in the background
#: (:class:`raylens.io.activation_writer.ActivationShardWriter`); the slice of it being written
#: (:func:`write_slice_rows`: at most an eighth of the budget) held twice, its train / held-out
#: split and the Parquet writer's encoding of it; and what the allocators and Python keep
#: (measured 10-20 MiB: tests/test_activation_storage.py).
WINDOW_COPIES = 4
#: Host bytes per row of a window besides its values: the token ids, offsets and unit objects in
#: Python, the lists the other Arrow columns are built from, those columns (about 1.4 KiB
#: measured at granularity token: tests/test_activation_storage.py).
ROW_OVERHEAD_BYTES = 1536


def row_host_bytes(d_model: int, dtype: str = "float16") -> int:
    """Host bytes of one stored row while extraction holds it: ``d_model x bytes(dtype)`` +
    :data:`ROW_OVERHEAD_BYTES` (a window holds :data:`WINDOW_COPIES` of it, :func:`window_rows`)."""
    from raylens.io.schemas import ACTIVATION_DTYPES
    return int(d_model) * ACTIVATION_DTYPES[dtype] + ROW_OVERHEAD_BYTES


def window_rows(max_host_bytes: int, d_model: int, dtype: str = "float16") -> int:
    """Rows per extraction window so all of a window's host copies fit in ``max_host_bytes``:
    :data:`WINDOW_COPIES` x (the stored values + :data:`ROW_OVERHEAD_BYTES`), i.e.
    ``4 x (d_model x bytes(dtype) + 1536)`` bytes per row (38,912 at d_model 4,096 in float16: a
    512 MiB budget holds 13,797 rows, 107 documents of 128 tokens). Freed memory is handed back to the OS between windows
    (:func:`raylens.io.memory.release_host_memory`). At least 1."""
    return max(1, int(max_host_bytes) // (WINDOW_COPIES * row_host_bytes(d_model, dtype)))


def write_slice_rows(max_host_bytes: int, row_group_bytes: int, d_model: int, dtype: str = "float16") -> int:
    """Rows of a window split (train / held-out) and written at a time: at most
    ``row_group_bytes`` and an eighth of ``max_host_bytes`` of stored values (see
    :data:`WINDOW_COPIES`), so the copies made to write a window stay within its budget. At least 1."""
    budget = min(int(row_group_bytes), int(max_host_bytes) // (2 * WINDOW_COPIES))
    return max(1, budget // row_host_bytes(d_model, dtype))


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Seeded token (unit) sampling for storage-bound runs: each document keeps its units with
    probability ``rate``, then at most ``max_rows_per_document`` of them (drawn without
    replacement), in their original order. The draw depends only on ``(seed, doc_id)``, so a
    document keeps the same rows whatever its shard, batch or worker.

    Raises:
        ValueError: ``rate`` outside ``(0, 1]`` or ``max_rows_per_document < 1``.
    """

    max_rows_per_document: int | None = None
    rate: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")
        if self.max_rows_per_document is not None and self.max_rows_per_document < 1:
            raise ValueError(f"max_rows_per_document must be >= 1, got {self.max_rows_per_document}")

    def keep(self, n_units: int, doc_id: int) -> np.ndarray:
        """Sorted indices ``(n_kept,)`` of the units of document ``doc_id`` to keep."""
        idx = np.arange(n_units)
        if n_units == 0 or (self.rate >= 1.0 and (self.max_rows_per_document or n_units) >= n_units):
            return idx
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(doc_id) & 0xFFFFFFFFFFFFFFFF])
        if self.rate < 1.0:
            idx = idx[rng.random(n_units) < self.rate]
        m = self.max_rows_per_document
        if m is not None and len(idx) > m:
            idx = np.sort(rng.choice(idx, size=m, replace=False))
        return idx

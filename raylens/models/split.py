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
import logging
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import activations_schema, tensor_array
from raylens.models.loading import LoadedModel, load_model, meta_model
from raylens.text import TEXT_UNITS, group_tokens

log = logging.getLogger(__name__)

GRANULARITIES = ("token", "word", "sentence", "sample_mean", "cls")


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


#: The largest finite float16 value; bfloat16 and float32 activations can exceed it.
FLOAT16_MAX = 65504.0


def float16_overflow_issues(per_doc: dict[int, np.ndarray], doc_ids: Sequence[int]) -> list[dict]:
    """One issue per document whose activations exceed float16's range (``|x| > 65,504``):
    stored as float16 they become ``inf`` (those rows are left out of the fit by
    :class:`raylens.io.readers.ActivationStream`). Bfloat16 models reach such values (a massive
    activation); ``extraction.activation_dtype: float32`` stores them exactly.

    Args:
        per_doc: document index -> its unit activations, float32 ``(n_units, d_model)``.
        doc_ids: ``(n_docs,)`` ids, indexed by the same document index.
    """
    out = []
    for i, values in per_doc.items():
        n = int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
        if n:
            out.append({"doc_id": int(doc_ids[i]), "stage": "extract", "kind": "float16_overflow",
                        "error": f"{n} activation values beyond float16's range (|x| > 65,504) stored as inf; "
                                 "those rows are left out of the fit; use extraction.activation_dtype: float32"})
    return out


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
        """Tokenise each text alone (no padding), with character offsets, truncated to ``max_tokens``."""
        enc = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=max_tokens,
            return_offsets_mapping=True, return_special_tokens_mask=True, return_overflowing_tokens=False,
        )
        full = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [
            Encoded(list(ids), [tuple(o) for o in offs], list(sp), len(f) > len(ids))
            for ids, offs, sp, f in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], full)
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
        positions below ``exclude_first_tokens`` and special tokens are left out."""
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

    def extract(
        self,
        texts: Sequence[str],
        doc_ids: Sequence[int],
        *,
        granularity: str = "token",
        batch_size: int = 8,
        max_tokens: int = 128,
        dtype: str = "float16",
        exclude_first_tokens: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[pa.Table, list[dict]]:
        """Activations of a list of documents at the split point.

        Args:
            texts: ``n_docs`` strings.
            doc_ids: their ids (int64).
            granularity: one of :data:`GRANULARITIES`.
            batch_size: documents per forward pass (sorted by length to cut padding).
            max_tokens: longer documents are truncated (recorded in the errors list as a note).
            dtype: ``"float16"`` or ``"float32"`` storage of the activations.
            exclude_first_tokens: leave out token positions below this (special tokens are
                always left out). Decoders without a BOS token turn their first position into
                an attention sink: in SmolLM2 its activation norm is about 100x the others and
                it carries 98% of the activation variance at layer 15, so the job drops it by
                default (``extraction.exclude_first_tokens: 1``).
            progress: called with the number of documents done after each batch.

        Returns:
            ``(table, issues)``: the activation table (schema :func:`raylens.io.schemas.activations_schema`,
            ``n_units`` rows, ordered by ``doc_id`` then ``unit``; ``predicted_class`` set for a
            sequence classifier at granularity ``cls``, whose forward then runs to the end,
            null otherwise) and one dict ``{doc_id, stage, kind, error}`` per empty, truncated or
            float16-overflowing document (``kind``: ``empty``, ``truncated``, ``float16_overflow``;
            empty ones produce no rows).

        Raises:
            ValueError: unknown granularity, or ``texts`` and ``doc_ids`` of different lengths.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if len(texts) != len(doc_ids):
            raise ValueError(f"{len(texts)} texts but {len(doc_ids)} doc_ids")
        texts = [t if isinstance(t, str) else "" for t in texts]
        encoded = self.encode(texts, max_tokens) if texts else []
        units = [self.units(t, e, granularity, exclude_first_tokens) if t.strip() else [] for t, e in zip(texts, encoded)]
        issues: list[dict] = []
        for doc, t, e, u in zip(doc_ids, texts, encoded, units):
            if not t.strip() or not u:
                issues.append({"doc_id": int(doc), "stage": "extract", "kind": "empty",
                               "error": "empty text: no tokens, skipped"})
            elif e.truncated:
                issues.append({"doc_id": int(doc), "stage": "extract", "kind": "truncated",
                               "error": f"truncated to max_tokens={max_tokens}"})
        # A classifier's prediction costs the rest of the forward: only at granularity cls, where
        # the row is the one the classification head reads (the forward then does not stop early).
        predict = granularity == "cls" and self.loaded.task == "sequence_classification"
        per_doc, predicted = self.unit_activations(encoded, units, batch_size=batch_size, predict=predict,
                                                   progress=progress)
        if dtype == "float16":
            issues += float16_overflow_issues(per_doc, doc_ids)
        return self.activation_table(doc_ids, units, per_doc, predicted, dtype), issues

    def unit_activations(self, encoded: Sequence[Encoded], units: Sequence[Sequence[Unit]], *, batch_size: int,
                         predict: bool = False, progress: Callable[[int], None] | None = None,
                         ) -> tuple[dict[int, np.ndarray], dict[int, int]]:
        """Mean split-point activation of every unit, documents batched by length.

        Returns:
            ``(per_doc, predicted)``: document index -> float32 ``(n_units, d_model)`` for every
            document with units; document index -> predicted class when ``predict`` (a sequence
            classifier's full forward), else empty.
        """
        todo = sorted((i for i, u in enumerate(units) if u), key=lambda i: len(encoded[i].input_ids))
        per_doc: dict[int, np.ndarray] = {}
        predicted: dict[int, int] = {}
        for b in range(0, len(todo), batch_size):
            idx = todo[b: b + batch_size]
            ids, mask = self.pad([encoded[i] for i in idx])
            if predict:
                h, pred = self.hidden_and_prediction(ids, mask)
                h = h.float()
                predicted.update({i: int(pred[row]) for row, i in enumerate(idx)})
            else:
                h = self.hidden(ids, mask).float()
            for row, i in enumerate(idx):
                per_doc[i] = np.stack([h[row, u.tokens].mean(0).cpu().numpy() for u in units[i]])
            if progress is not None:
                progress(len(idx))
        return per_doc, predicted

    def activation_table(self, doc_ids: Sequence[int], units: Sequence[Sequence[Unit]],
                         per_doc: dict[int, np.ndarray], predicted: dict[int, int], dtype: str) -> pa.Table:
        """The activation table (schema :func:`raylens.io.schemas.activations_schema`) of
        :meth:`unit_activations`' output, ordered by ``doc_id`` then ``unit``."""
        cols: dict[str, list] = {k: [] for k in ("doc_id", "unit", "char_start", "char_end", "token_start",
                                               "token_end", "text", "predicted_class")}
        acts = []
        for i in sorted(per_doc, key=lambda i: doc_ids[i]):
            for k, u in enumerate(units[i]):
                cols["doc_id"].append(int(doc_ids[i]))
                cols["unit"].append(k)
                cols["char_start"].append(u.char_start)
                cols["char_end"].append(u.char_end)
                cols["token_start"].append(min(u.tokens))
                cols["token_end"].append(max(u.tokens) + 1)
                cols["text"].append(u.text)
                cols["predicted_class"].append(predicted.get(i))
            acts.append(per_doc[i])
        values = np.concatenate(acts) if acts else np.zeros((0, self.d_model), np.float32)
        schema = activations_schema(self.d_model, dtype)
        arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name != "activation"]
        return pa.Table.from_arrays(arrays + [tensor_array(values, dtype)], schema=schema)

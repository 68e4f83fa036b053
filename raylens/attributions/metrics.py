"""Faithfulness metrics for attributions: do the elements an attribution ranks first really drive
the model's output?

Four metrics, for sequence classifiers and causal LMs, each computed per
:class:`~raylens.attributions.output.AttributionOutput` and per target, each returned beside the
same metric for random attributions (seeded random rankings, averaged over ``n_random``
draws) so a score can be read against chance:

- :class:`Deletion` (RISE [1]_): the target score while the elements are removed, most
  important first; area under that curve, **lower is better**.
- :class:`Insertion` (RISE [1]_): the target score while the elements are put back into a fully
  masked input, most important first; area under that curve, **higher is better**.
- :class:`AOPCComprehensiveness` (ERASER [2]_, AOPC [3]_): mean drop of the score when the top
  k % of the elements are removed, over a grid of k; **higher is better**.
- :class:`AOPCSufficiency` (ERASER [2]_): mean drop of the score when only the top k % of the
  elements are kept; **lower is better**.
- :func:`faithfulness`: the four at once (one shared scoring pass), averaged.

**Target score.** ``inference_mode`` picks the score, as in the attribution methods:
``"softmax"``, ``"logits"`` or ``"log_softmax"``. The default (``None``) depends on the task:
``"softmax"`` for classifiers (a probability: curves and AUCs lie in ``[0, 1]`` and compare
across inputs) and ``"log_softmax"`` for causal LMs, because over a vocabulary of tens of
thousands of tokens the probability of the target collapses to about 0 as soon as a few
context tokens are masked, which flattens insertion curves and hides the difference between
rankings. Measured on SmolLM2 with a leave-one-out oracle: with probabilities most curve
points were below 1e-3 and the oracle's mean insertion AUC over 4 short prompts came out
below the random rankings' (0.044 vs 0.047); with log-probabilities the oracle beat random
rankings on all four metrics on each of 7 prompts, and its reverse lost to them.

For a classifier the score of target ``c`` is that function of the class logits at ``c``. For a
causal LM the score of target token ``t`` is read with teacher forcing on
``input + targets[:t]``: one forward of ``input_ids ++ targets[:-1]`` scores every target token
at once (the logits at position ``len(input_ids) - 1 + t`` give target ``t``); only input
elements are masked, the target prefix is always kept. ``AttributionOutput.input_ids`` is
therefore the prompt only, without the explained output tokens.

**Masking** (what "removing" an element means). Every token position an element covers
(``element_tokens``) is replaced by one replacement token id, the attention mask stays 1 there
(the sequence keeps its length and positions); special tokens (not elements) are never
masked. The replacement id is, in order: the ``replace_token_id`` argument; the
``"replace_token_id"`` entry of the output's ``params`` (so a method that records the token it
masked with is evaluated with that same token); :func:`default_replace_token_id` of the
tokenizer, i.e. the tokenizer's mask token (``[MASK]`` for BERT-like models), else its pad
token (``<|im_end|>`` for the built-in SmolLM2, whose tokenizer has no mask token). The
attribution methods (:mod:`raylens.attributions.perturbations`) mask the same way, with the same
default rule, and record their ``replace_token_id`` in ``params``: the metric removes exactly
what the methods perturbed.

**Ranking.** Elements are ranked by their signed score for the target, highest first (ties by
position; NaN ranks last). A negative score means "pushes the target down", so it is removed
or inserted last.

**Steps.** Deletion and insertion evaluate ``n_steps + 1`` points: after removing (inserting)
``round(k * n_elements / n_steps)`` elements, ``k = 0..n_steps`` (``n_steps=None``: one element
per step). The AUC is the trapezoid over the fraction of elements removed (inserted), so it
is normalised to the ``[0, 1]`` fraction axis and has the units of the score. AOPC uses the
fraction grid ``fractions`` (ERASER's ``1, 5, 10, 20, 50 %`` by default), removing or keeping
``ceil(f * n_elements)`` elements, and averages the drops over the grid.

**Batching.** The perturbed inputs of all outputs and all metrics of a call are de-duplicated
(the unmasked and fully masked inputs are scored once for all targets and metrics; random
rankings are shared by the targets of an output; outputs of several methods for the same text
share their unmasked, fully masked and random rows), packed ``batch_size`` rows at a time,
longest first, right-padded with attention masks: padding never changes a score (batch size 1
equals batch size N up to float rounding, tested). The scoring runs in the attribution methods'
engine (:class:`~raylens.attributions.engine.InferenceEngine`); only the default score differs.

References:
    .. [1] V. Petsiuk, A. Das, K. Saenko. "RISE: Randomized Input Sampling for Explanation of
       Black-box Models." BMVC 2018 (deletion and insertion curves).
    .. [2] J. DeYoung et al. "ERASER: A Benchmark to Evaluate Rationalized NLP Models." ACL 2020
       (comprehensiveness and sufficiency, AOPC over bins of 1, 5, 10, 20, 50 %).
    .. [3] W. Samek, A. Binder, G. Montavon, S. Lapuschkin, K.-R. Müller. "Evaluating the
       Visualization of What a Deep Neural Network Has Learned." IEEE TNNLS 28(11), 2017
       (arXiv:1509.06321) (AOPC, the area over the most-relevant-first perturbation curve).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from raylens.attributions.constraints import Int, OneOf, check_values
from raylens.attributions.engine import INFERENCE_MODES, InferenceEngine, RowBlock, default_replace_token_id
from raylens.attributions.engine import target_pairs, teacher_forced
from raylens.attributions.inputs import unwrap_model
from raylens.attributions.output import AttributionOutput

#: ``inference_mode=None`` picks the score per task.
DEFAULT_INFERENCE_MODES = {"sequence_classification": "softmax", "causal_lm": "log_softmax"}
#: ERASER's AOPC bins (fraction of elements removed or kept).
ERASER_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20, 0.50)


def _model_task(model: Any, tokenizer: Any) -> tuple[torch.nn.Module, Any, str | None]:
    """``(hf_model, tokenizer, task)`` from a :class:`~raylens.models.loading.LoadedModel` or an HF
    model (its task from the config's architectures; None without a config)."""
    hf_model, tokenizer, task = unwrap_model(model, tokenizer)
    if task is None and hasattr(hf_model, "config"):
        from raylens.models.loading import detect_task

        task = detect_task(hf_model.config)
    return hf_model, tokenizer, task


class _Scorer:
    """Scores masked variants of attribution inputs with the attribution engine
    (:class:`~raylens.attributions.engine.InferenceEngine`: batched, right-padded).

    ``score(outputs, masks)`` takes one boolean keep-mask matrix ``(n_masks, n_elements)`` per
    output and returns one ``(n_masks, n_targets)`` float64 matrix per output.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, inference_mode: str | None,
                 replace_token_id: int | None) -> None:
        check_values({"inference_mode": OneOf(INFERENCE_MODES, optional=True), "batch_size": Int(min=1)},
                     {"inference_mode": inference_mode, "batch_size": batch_size})
        self.model, self.tokenizer, self.task = _model_task(model, tokenizer)
        self.batch_size = batch_size
        self.inference_mode = inference_mode
        self.replace_token_id = replace_token_id
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0  # value irrelevant: attention mask 0

    def mode_for(self, task: str) -> str:
        return self.inference_mode or DEFAULT_INFERENCE_MODES[task]

    def replace_id_for(self, out: AttributionOutput) -> int:
        if self.replace_token_id is not None:
            return int(self.replace_token_id)
        if out.params and out.params.get("replace_token_id") is not None:
            return int(out.params["replace_token_id"])
        return default_replace_token_id(self.tokenizer)

    def _check(self, out: AttributionOutput) -> None:
        if self.task is not None and self.task != "base" and out.task != self.task:
            raise ValueError(f"an output of task {out.task!r} cannot be scored with a {self.task!r} model")
        if out.task not in ("sequence_classification", "causal_lm"):
            raise ValueError(f"unknown task {out.task!r}")
        n = len(out.input_ids)
        for e, toks in enumerate(out.element_tokens):
            if any(p < 0 or p >= n for p in toks):
                raise ValueError(f"element {e} ({out.elements[e]!r}) covers token positions {toks} "
                                 f"outside input_ids (length {n})")
        if out.task == "causal_lm" and n == 0:
            raise ValueError("a causal-LM output needs a non-empty input")

    def score(self, outputs: Sequence[AttributionOutput], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len({o.task for o in outputs}) > 1:
            raise ValueError("outputs of different tasks cannot be scored with one model")
        rows, where = self._unique_rows(outputs, masks)
        scores: list[np.ndarray | None] = [None] * len(rows)
        if rows:
            task = outputs[0].task
            # Longest first, so each batch holds similar lengths (little padding work).
            order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
            blocks = [RowBlock(rows[r][1][None, :], *target_pairs(task, len(outputs[rows[r][0]].input_ids),
                                                                  outputs[rows[r][0]].targets)) for r in order]
            engine = InferenceEngine(self.model, task, pad_id=self.pad_id, batch_size=self.batch_size,
                                     inference_mode=None, progress=False, keep_logits="tail")
            with engine.eval_mode():
                for r, v in zip(order, engine.score_blocks(blocks, mode=self.mode_for(task))):
                    scores[r] = v[0]
        return [np.stack([scores[r] for r in idx]) if idx else np.zeros((0, out.n_targets))
                for out, idx in zip(outputs, where)]

    def _unique_rows(self, outputs: Sequence[AttributionOutput],
                     masks: Sequence[np.ndarray]) -> tuple[list[tuple[int, np.ndarray]], list[list[int]]]:
        """The distinct token-id rows to score, ``(index of the output that owns it, ids)``, and per
        output, per mask, the index of its row. Identical rows (same tokens, same targets: e.g. the
        same input explained by several methods, whose unmasked, fully masked and random-ranking
        rows coincide) run once."""
        unique: dict[tuple, int] = {}
        rows: list[tuple[int, np.ndarray]] = []
        where: list[list[int]] = []
        for i, (out, m) in enumerate(zip(outputs, masks)):
            self._check(out)
            base = np.asarray(out.input_ids, dtype=np.int64)
            rid = self.replace_id_for(out)
            idx = []
            for j in range(m.shape[0]):
                ids = base.copy()
                for e in np.flatnonzero(~m[j]):
                    ids[out.element_tokens[e]] = rid
                ids = teacher_forced(out.task, ids, out.targets)  # the last target token is never an input
                key = (out.task, len(base), tuple(out.targets), ids.tobytes())
                if key not in unique:
                    unique[key] = len(rows)
                    rows.append((i, ids))
                idx.append(unique[key])
            where.append(idx)
        return rows, where


# ----------------------------------------------------------------------------- rankings and plans


def _rankings(out: AttributionOutput) -> np.ndarray:
    """``(n_targets, n_elements)``: element indices per target, most important first."""
    s = np.nan_to_num(np.asarray(out.scores, dtype=np.float64), nan=-np.inf)
    return np.argsort(-s, axis=1, kind="stable")


def _random_rankings(out: AttributionOutput, n_random: int, seed: int) -> np.ndarray:
    """``(n_random, n_elements)`` seeded permutations; the seed also hashes the output's text and
    elements, so an output gets the same draws wherever it sits in a list."""
    key = zlib.crc32(("\x00".join([out.text, *out.elements])).encode("utf-8", "surrogatepass"))
    rng = np.random.default_rng([seed, key, out.n_elements])
    return np.stack([rng.permutation(out.n_elements) for _ in range(n_random)]) if n_random else \
        np.zeros((0, out.n_elements), dtype=np.int64)


def _masks_for(rankings: np.ndarray, counts: np.ndarray, n_el: int, keep_top: bool) -> np.ndarray:
    """Keep-masks ``(n_rankings * n_counts, n_el)``: per ranking and count, the top ``count``
    elements kept (``keep_top``) or removed (not ``keep_top``)."""
    n_r, n_c = rankings.shape[0], len(counts)
    masks = np.full((n_r, n_c, n_el), not keep_top, dtype=bool)
    for r in range(n_r):
        for c, k in enumerate(counts):
            masks[r, c, rankings[r, :k]] = keep_top
    return masks.reshape(n_r * n_c, n_el)


def _curve_counts(n_el: int, n_steps: int | None) -> np.ndarray:
    if n_steps is None:
        return np.arange(n_el + 1)
    # round half up (np.rint rounds half to even, which spaces the points unevenly)
    return np.floor(np.linspace(0, n_el, n_steps + 1) + 0.5).astype(np.int64)


def _auc(curves: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.trapezoid(curves, x, axis=-1)


class _Metric:
    """Shared machinery; subclasses define ``_plan``."""

    #: True when a higher value means a more faithful attribution.
    higher_is_better: bool
    name: str

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 32,
                 inference_mode: str | None = None, n_random: int = 3, seed: int = 0,
                 replace_token_id: int | None = None) -> None:
        if n_random < 0:
            raise ValueError(f"n_random must be >= 0, got {n_random}")
        self.scorer = _Scorer(model, tokenizer, batch_size=batch_size, inference_mode=inference_mode,
                              replace_token_id=replace_token_id)
        self.n_random = n_random
        self.seed = seed

    def _plan(self, out: AttributionOutput) -> tuple[np.ndarray, Callable[[np.ndarray], dict[str, Any]]]:
        raise NotImplementedError

    def __call__(self, outputs: Sequence[AttributionOutput] | AttributionOutput) -> list[dict[str, Any]]:
        """Evaluate each output; returns one dict per output (see the class docstring)."""
        if isinstance(outputs, AttributionOutput):
            outputs = [outputs]
        return _run([self], list(outputs), self.scorer)[0]


def _run(metrics: Sequence[_Metric], outputs: list[AttributionOutput], scorer: _Scorer) -> list[list[dict]]:
    """Plan every metric on every output, score the de-duplicated masks once, finish."""
    plans = [[m._plan(out) for out in outputs] for m in metrics]
    unique_masks, inverses = [], []
    for i, out in enumerate(outputs):
        allm = np.concatenate([plans[k][i][0] for k in range(len(metrics))], axis=0)
        if allm.shape[0] == 0:
            uniq, inv = allm, np.zeros(0, dtype=np.int64)
        else:
            uniq, inv = np.unique(allm, axis=0, return_inverse=True)
        unique_masks.append(uniq)
        inverses.append(np.asarray(inv).reshape(-1))
    scores = scorer.score(outputs, unique_masks)
    results: list[list[dict]] = [[] for _ in metrics]
    for i in range(len(outputs)):
        full = scores[i][inverses[i]]
        start = 0
        for k in range(len(metrics)):
            masks, finish = plans[k][i]
            results[k].append(finish(full[start:start + masks.shape[0]]))
            start += masks.shape[0]
    return results


class _CurveMetric(_Metric):
    keep_top: bool  # insertion keeps the top elements, deletion removes them

    def __init__(self, model: Any, tokenizer: Any = None, *, n_steps: int | None = 10, batch_size: int = 32,
                 inference_mode: str | None = None, n_random: int = 3, seed: int = 0,
                 replace_token_id: int | None = None) -> None:
        if n_steps is not None and n_steps < 1:
            raise ValueError(f"n_steps must be >= 1 or None, got {n_steps}")
        super().__init__(model, tokenizer, batch_size=batch_size, inference_mode=inference_mode,
                         n_random=n_random, seed=seed, replace_token_id=replace_token_id)
        self.n_steps = n_steps

    def _plan(self, out):
        n_el, n_t = out.n_elements, out.n_targets
        mode = self.scorer.mode_for(out.task)
        counts = _curve_counts(n_el, self.n_steps)
        x = counts / n_el if n_el else np.linspace(0.0, 1.0, len(counts))
        ranks = _rankings(out)
        rand = _random_rankings(out, self.n_random, self.seed)
        m_attr = _masks_for(ranks, counts, n_el, self.keep_top)  # (n_t * n_c, n_el)
        m_rand = _masks_for(rand, counts, n_el, self.keep_top)  # (n_random * n_c, n_el)
        n_c = len(counts)

        def finish(s: np.ndarray) -> dict[str, Any]:
            s_attr, s_rand = s[:n_t * n_c], s[n_t * n_c:]
            # Row t*n_c + c of the attribution part was masked by target t's ranking: read target t.
            curve = s_attr.reshape(n_t, n_c, n_t)[np.arange(n_t), :, np.arange(n_t)]
            # Random rankings are shared by the targets: (n_random, n_c, n_t) -> (n_t, n_random, n_c).
            r = s_rand.reshape(self.n_random, n_c, n_t).transpose(2, 0, 1)
            rand_auc = _auc(r, x)
            return {
                "inference_mode": mode,
                "auc": _auc(curve, x),
                "curve": curve,
                "fractions": x,
                "counts": counts,
                "random_auc": rand_auc.mean(axis=1) if self.n_random else np.full(n_t, np.nan),
                "random_auc_std": rand_auc.std(axis=1) if self.n_random else np.full(n_t, np.nan),
                "random_curve": r.mean(axis=1) if self.n_random else np.full((n_t, n_c), np.nan),
            }

        return np.concatenate([m_attr, m_rand]), finish


class Deletion(_CurveMetric):
    """Deletion curve and AUC (Petsiuk et al. 2018, RISE). **Lower is better.**

    Removes (masks) the elements from the most to the least important for each target and
    reads the target score after each step: a faithful attribution makes the score fall fast,
    so the area under the curve is small. The curve starts at the unmasked score and ends at
    the fully masked score, whatever the attribution; only its path (hence the AUC) depends on
    the ranking. Range: within the range of the score (``[0, 1]`` for ``"softmax"``, ``<= 0``
    for ``"log_softmax"``).
    Compare with ``random_auc``: a useful attribution has ``auc < random_auc``.

    Args:
        model: a :class:`~raylens.models.loading.LoadedModel` or a Hugging Face model.
        tokenizer: needed with a bare HF model (mask/pad token ids); default the LoadedModel's.
        n_steps: points on the curve minus one (``None``: one element per step).
        batch_size: rows per forward pass.
        inference_mode: ``"softmax"``, ``"logits"`` or ``"log_softmax"``; default ``None``:
            softmax for classifiers, log-softmax for causal LMs (see the module docstring).
        n_random: random rankings averaged for the baseline (0 to skip it).
        seed: seed of the random rankings.
        replace_token_id: token that replaces removed elements (default: see module docstring).

    Calling it on a list of outputs returns one dict per output with ``auc`` ``(n_targets,)``,
    ``curve`` ``(n_targets, n_points)``, ``fractions`` and ``counts`` ``(n_points,)`` (fraction
    and number of elements removed at each point), ``random_auc`` and ``random_auc_std``
    ``(n_targets,)`` (mean and spread over the random draws) and ``random_curve``
    ``(n_targets, n_points)``; ``n_points = n_steps + 1``.
    """

    higher_is_better = False
    name = "deletion"
    keep_top = False


class Insertion(_CurveMetric):
    """Insertion curve and AUC (Petsiuk et al. 2018, RISE). **Higher is better.**

    Starts from the fully masked input and inserts (unmasks) the elements from the most to the
    least important for each target, reading the target score after each step: a faithful
    attribution makes the score rise fast, so the area under the curve is large. The curve
    starts at the fully masked score and ends at the unmasked score. Range: within the range
    of the score (``[0, 1]`` for ``"softmax"``). Compare with ``random_auc``: a useful
    attribution has ``auc > random_auc``.

    Arguments and returned keys as :class:`Deletion` (``fractions``/``counts`` count inserted
    elements).
    """

    higher_is_better = True
    name = "insertion"
    keep_top = True


class _AOPCMetric(_Metric):
    keep_top: bool

    def __init__(self, model: Any, tokenizer: Any = None, *, fractions: Sequence[float] = ERASER_FRACTIONS,
                 batch_size: int = 32, inference_mode: str | None = None, n_random: int = 3, seed: int = 0,
                 replace_token_id: int | None = None) -> None:
        fractions = tuple(float(f) for f in fractions)
        if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"fractions must be a non-empty list of values in (0, 1], got {fractions}")
        super().__init__(model, tokenizer, batch_size=batch_size, inference_mode=inference_mode,
                         n_random=n_random, seed=seed, replace_token_id=replace_token_id)
        self.fractions = np.asarray(fractions)

    def _plan(self, out):
        n_el, n_t = out.n_elements, out.n_targets
        mode = self.scorer.mode_for(out.task)
        counts = np.minimum(np.ceil(self.fractions * n_el - 1e-9).astype(np.int64), n_el)
        n_k = len(counts)
        full = np.ones((1, n_el), dtype=bool)
        m_attr = _masks_for(_rankings(out), counts, n_el, self.keep_top)
        m_rand = _masks_for(_random_rankings(out, self.n_random, self.seed), counts, n_el, self.keep_top)

        def finish(s: np.ndarray) -> dict[str, Any]:
            f_x = s[0]  # (n_t,) unmasked
            s_attr = s[1:1 + n_t * n_k].reshape(n_t, n_k, n_t)[np.arange(n_t), :, np.arange(n_t)]
            drops = f_x[:, None] - s_attr
            r = f_x[:, None, None] - s[1 + n_t * n_k:].reshape(self.n_random, n_k, n_t).transpose(2, 0, 1)
            return {
                "inference_mode": mode,
                "aopc": drops.mean(axis=1),
                "drops": drops,
                "fractions": self.fractions.copy(),
                "counts": counts,
                "full_score": f_x,
                "random_aopc": r.mean(axis=(1, 2)) if self.n_random else np.full(n_t, np.nan),
                "random_aopc_std": r.mean(axis=2).std(axis=1) if self.n_random else np.full(n_t, np.nan),
                "random_drops": r.mean(axis=1) if self.n_random else np.full((n_t, n_k), np.nan),
            }

        return np.concatenate([full, m_attr, m_rand]), finish


class AOPCComprehensiveness(_AOPCMetric):
    """AOPC comprehensiveness (DeYoung et al. 2020, ERASER; Samek et al. AOPC). **Higher is better.**

    For each fraction ``f`` of the grid (ERASER: 1, 5, 10, 20, 50 %), removes the
    ``ceil(f * n_elements)`` most important elements and measures the drop of the target score,
    ``score(x) - score(x without them)``; the metric is the mean drop over the grid. Large when
    the top-ranked elements are needed for the prediction. Range: bounded by the score's range
    (``[-1, 1]`` for ``"softmax"``); can be negative. Compare with ``random_aopc``.

    Args: as :class:`Deletion`, with ``fractions`` (the grid) instead of ``n_steps``.

    Returns one dict per output: ``aopc`` ``(n_targets,)``, ``drops`` ``(n_targets, n_fractions)``,
    ``fractions``, ``counts``, ``full_score`` ``(n_targets,)`` (unmasked score), ``random_aopc``,
    ``random_aopc_std`` ``(n_targets,)`` and ``random_drops`` ``(n_targets, n_fractions)``.
    """

    higher_is_better = True
    name = "comprehensiveness"
    keep_top = False


class AOPCSufficiency(_AOPCMetric):
    """AOPC sufficiency (DeYoung et al. 2020, ERASER). **Lower is better.**

    For each fraction ``f`` of the grid, keeps only the ``ceil(f * n_elements)`` most important
    elements (masks all others) and measures the drop of the target score,
    ``score(x) - score(only them)``; the metric is the mean drop over the grid. Small (or
    negative) when the top-ranked elements alone suffice for the prediction. Range: bounded by
    the score's range (``[-1, 1]`` for ``"softmax"``). Compare with ``random_aopc``: a useful
    attribution has ``aopc < random_aopc``.

    Arguments and returned keys as :class:`AOPCComprehensiveness`.
    """

    higher_is_better = False
    name = "sufficiency"
    keep_top = True


def faithfulness(model: Any, outputs: Sequence[AttributionOutput], tokenizer: Any = None, *,
                 n_steps: int | None = 10, fractions: Sequence[float] = ERASER_FRACTIONS,
                 batch_size: int = 32, inference_mode: str | None = None, n_random: int = 3,
                 seed: int = 0, replace_token_id: int | None = None,
                 return_per_output: bool = False) -> dict[str, Any]:
    """All four metrics at once, averaged over outputs and targets (one shared scoring pass).

    Returns a dict with, for each metric ``m`` in ``deletion_auc`` (lower is better),
    ``insertion_auc`` (higher), ``comprehensiveness`` (higher) and ``sufficiency`` (lower):
    ``m`` (mean over every target of every output) and ``m + "_random"`` (the same for random
    rankings); ``higher_is_better`` maps each metric name to its direction; ``n_outputs`` and
    ``n_targets``. With ``return_per_output=True`` it also holds ``per_output``: the four lists
    of per-output dicts (keys ``deletion``, ``insertion``, ``comprehensiveness``,
    ``sufficiency``), as the metric classes return them.
    """
    common = dict(batch_size=batch_size, inference_mode=inference_mode, n_random=n_random, seed=seed,
                  replace_token_id=replace_token_id)
    metrics: list[_Metric] = [
        Deletion(model, tokenizer, n_steps=n_steps, **common),
        Insertion(model, tokenizer, n_steps=n_steps, **common),
        AOPCComprehensiveness(model, tokenizer, fractions=fractions, **common),
        AOPCSufficiency(model, tokenizer, fractions=fractions, **common),
    ]
    outputs = list(outputs)
    per = _run(metrics, outputs, metrics[0].scorer)

    def mean(results: list[dict], key: str) -> float:
        vals = [np.asarray(r[key], dtype=np.float64).ravel() for r in results]
        vals = np.concatenate(vals) if vals else np.zeros(0)
        return float(np.nanmean(vals)) if vals.size else float("nan")

    summary: dict[str, Any] = {
        "deletion_auc": mean(per[0], "auc"), "deletion_auc_random": mean(per[0], "random_auc"),
        "insertion_auc": mean(per[1], "auc"), "insertion_auc_random": mean(per[1], "random_auc"),
        "comprehensiveness": mean(per[2], "aopc"), "comprehensiveness_random": mean(per[2], "random_aopc"),
        "sufficiency": mean(per[3], "aopc"), "sufficiency_random": mean(per[3], "random_aopc"),
        "higher_is_better": {"deletion_auc": False, "insertion_auc": True,
                             "comprehensiveness": True, "sufficiency": False},
        "n_outputs": len(outputs),
        "n_targets": int(sum(o.n_targets for o in outputs)),
    }
    if return_per_output:
        summary["per_output"] = {m.name: p for m, p in zip(metrics, per)}
    return summary


__all__ = [
    "AOPCComprehensiveness", "AOPCSufficiency", "Deletion", "ERASER_FRACTIONS", "INFERENCE_MODES",
    "Insertion", "default_replace_token_id", "faithfulness",
]

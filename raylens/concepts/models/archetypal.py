"""Archetypal analysis, with raylens' own solver and the FurthestSum initialisation."""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from raylens.concepts.models.base import register_concept_model
from raylens.concepts.models.dictionary import DictionaryConceptModel
from raylens.concepts.models.params import Param, positive_int
from raylens.concepts.models.solvers import project_simplex, simplex_fista

__all__ = ["ArchetypalAnalysisConceptModel", "furthest_sum"]

logger = logging.getLogger(__name__)


def furthest_sum(a: Tensor, k: int, seed: int) -> Tensor:
    """FurthestSum initialisation of archetypal analysis (Mørup & Hansen 2012): indices
    (int64 ``(k,)``) of ``k`` rows of ``a (n, d)``, each maximising its summed distance to
    those already chosen, from a seeded random start (which is then replaced, as in the paper)."""
    n = a.shape[0]
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(n, (1,), generator=gen))
    chosen = [start]
    dist_sum = torch.zeros(n, dtype=torch.float64, device=a.device)
    sq = a.pow(2).sum(dim=1)
    for step in range(k + 1):
        last = chosen[-1]
        d = (sq - 2 * (a @ a[last]) + sq[last]).clamp_min(0).sqrt().to(torch.float64)
        dist_sum += d
        if step == k:
            break
        masked = dist_sum.clone()
        masked[torch.tensor(chosen, device=a.device)] = -1
        chosen.append(int(masked.argmax()))
    # drop the random start, keep the k furthest points
    return torch.tensor(chosen[1:k + 1], dtype=torch.long)



@register_concept_model
class ArchetypalAnalysisConceptModel(DictionaryConceptModel):
    """Archetypal analysis (Cutler & Breiman 1994, "Archetypal Analysis", Technometrics 36(4)).

    Archetypes ``D = W A`` ``(nb_concepts, d_model)`` are convex combinations of the fit rows
    ``A`` (rows of ``W (nb_concepts, n_fit)`` on the simplex) and every row is approximated by a
    convex combination of archetypes: codes ``z (n_rows, nb_concepts)`` on the simplex
    (non-negative, summing to 1). The model is translation-equivariant, but the solver's
    step sizes are much better conditioned on centred rows, so ``center=True`` by default
    (measured on SmolLM2 layer 15, 16 archetypes, 30 alternations: held-out explained
    variance 0.07 centred vs -0.02 uncentred); archetypes in activation space are
    ``dictionary + decoder_bias``.

    Solver (raylens'): FurthestSum initialisation (Mørup & Hansen 2012, "Archetypal analysis
    for machine learning and data mining"), then ``max_iter`` alternations of a warm-started
    FISTA step on ``Z`` and ``w_steps`` projected-gradient steps on ``W``, both with the
    Euclidean projection on the simplex (Duchi et al. 2008). overcomplete 0.3.0's
    ``ArchetypalAnalysis`` re-applies a softmax to already-stochastic rows at every step,
    which drives codes to uniform: measured on SmolLM2 layer-15 activations, 32 archetypes,
    held-out explained variance about 0.00 after 300 or 1000 iterations. Encoding new rows
    solves ``min_{z in simplex} ||x_norm - z D||^2`` by FISTA from the uniform point
    (``encode_iters``; deterministic, row-independent). Not streaming: fits a bounded seeded
    sample of ``max_fit_rows`` rows (default 4096). State: ``D``.

    Parameters (besides :class:`ConceptModel`'s):
        max_iter: alternations.
        z_steps: FISTA iterations on ``Z`` per alternation.
        w_steps: projected-gradient steps on ``W`` per alternation.
        encode_iters: FISTA iterations when encoding.
    """

    method = "archetypal_analysis"
    parameters = {
        "max_iter": positive_int(100, "alternations"),
        "z_steps": positive_int(20, "FISTA iterations on Z per alternation"),
        "w_steps": positive_int(5, "projected-gradient steps on W per alternation"),
        "encode_iters": positive_int(200, "FISTA iterations when encoding"),
        "max_fit_rows": Param(4096, int, low=1, doc="most rows one fit uses"),
    }

    def fit(self, activations: Tensor) -> ArchetypalAnalysisConceptModel:
        """Archetypal analysis of (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self.

        Raises:
            ValueError: wrong shape or at most ``nb_concepts`` rows.
        """
        x = self._bounded(activations, min_rows=self.nb_concepts + 1)
        self.set_normalization(x)
        a = self.normalize(x).detach()
        n, k = a.shape[0], self.nb_concepts
        t0 = time.perf_counter()
        with torch.no_grad():
            W = torch.zeros(k, n, device=a.device)
            W[torch.arange(k), furthest_sum(a, k, self.seed).to(a.device)] = 1.0
            D = W @ a
            lip_a = torch.linalg.matrix_norm(a.to(torch.float64), ord=2).pow(2).to(torch.float32)
            Z = None
            for _ in range(self.max_iter):
                Z = simplex_fista(a, D, self.z_steps, z0=Z)
                ztz = Z.T @ Z
                step = 1.0 / (torch.linalg.eigvalsh(ztz.to(torch.float64)).max().clamp_min(1e-12).to(torch.float32)
                              * lip_a)
                zta = Z.T @ a
                for _ in range(self.w_steps):
                    W = project_simplex(W - ((ztz @ D - zta) @ a.T) * step)
                    D = W @ a
        self._set_state(D)
        self.n_fit_rows = n
        logger.info("archetypal_analysis: %d archetypes from %d rows in %.1fs", k, n, time.perf_counter() - t0)
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return simplex_fista(x_norm, self._D, self.encode_iters, lip=self._lipschitz())

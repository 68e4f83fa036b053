"""The six SAE families, each an overcomplete module trained by the shared SAE loop
(:class:`raylens.concepts.models.sae.SAEConceptModel`): TopK, vanilla (ReLU + L1),
BatchTopK, JumpReLU, matching pursuit and relaxed archetypal. Each class declares only the
parameters it adds; shapes, streaming and papers are in its docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raylens.concepts.models.base import register_concept_model
from raylens.concepts.models.params import Param
from raylens.concepts.models.sae import TOP_K, SAEConceptModel

__all__ = [
    "JUMP_KERNELS",
    "ArchetypalSAEConceptModel",
    "BatchTopKSAEConceptModel",
    "JumpReLUSAEConceptModel",
    "MPSAEConceptModel",
    "TopKSAEConceptModel",
    "VanillaSAEConceptModel",
]

#: Pseudo-gradient kernels of ``overcomplete.sae.JumpSAE`` (checked against it by the tests).
JUMP_KERNELS = ("cauchy", "cosine", "epanechnikov", "gaussian", "quartic", "rectangle", "silverman", "triangular")


@register_concept_model
class TopKSAEConceptModel(SAEConceptModel):
    """TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders", arXiv 2406.04093), wrapping ``overcomplete.sae.TopKSAE``.

    ``z = TopK_k(ReLU(W_enc (x - mean) / scale + b_enc))`` of shape ``(n_rows, nb_concepts)``
    with at most ``top_k`` non-zeros per row; ``x_hat = (z @ D) * scale + mean`` with unit-norm
    atoms ``D (nb_concepts, d_model)`` in the normalised space. ``mean`` plays the role of
    Gao et al.'s pre-encoder/decoder bias (fixed, estimated on the first rows rather than
    learned); the encoder is initialised as ``D^T`` as in the paper.

    Streaming; training as in :class:`SAEConceptModel` (no sparsity penalty: TopK is the
    sparsity). No AuxK loss yet (dead latents are not revived). State: the SAE weights and
    the fused dictionary.

    Parameters (besides :class:`SAEConceptModel`'s):
        top_k: active latents per row (default: ``max(nb_concepts // 16, 1)``).
    """

    method = "topk_sae"
    parameters = {"top_k": TOP_K}

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import TopKSAE

        return TopKSAE(self.d_model, nb_concepts=self.nb_concepts, top_k=self.top_k, device=self.device)


@register_concept_model
class VanillaSAEConceptModel(SAEConceptModel):
    """ReLU sparse autoencoder with an L1 penalty (the "vanilla" SAE of Bricken et al. 2023,
    "Towards Monosemanticity"; Cunningham et al. 2023, arXiv 2309.08600), wrapping
    ``overcomplete.sae.SAE`` with its linear encoder.

    ``z = ReLU(W_enc (x - mean) / scale + b_enc)`` ``(n_rows, nb_concepts)``;
    ``x_hat = (z @ D) * scale + mean`` with unit-norm atoms ``D (nb_concepts, d_model)``.
    Loss: ``mean((x_norm - x_hat_norm)^2) + l1_coef * mean_rows(||z||_1) / d_model``: since the
    normalised rows have a mean squared norm of about 1, ``l1_coef`` is the fraction of
    variance traded for one unit of code L1 norm. Sparsity is soft: codes below zero are
    cut, the rest are not thresholded. Streaming (see :class:`SAEConceptModel`). State: SAE
    weights and the fused dictionary.

    Parameters (besides :class:`SAEConceptModel`'s):
        l1_coef: L1 coefficient (see above).
    """

    method = "vanilla_sae"
    parameters = {"l1_coef": Param(0.05, float, low=0, doc="L1 coefficient")}

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import SAE

        return SAE(self.d_model, nb_concepts=self.nb_concepts, device=self.device)

    def penalty(self, sae, batch, pre_codes, codes, x_hat):
        return self.l1_coef * codes.abs().sum(dim=1).mean() / batch.shape[1]


def _batchtopk_pre_hook(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a BatchTopK SAE: keep ``k_per_row * batch_rows`` codes per batch.

    overcomplete's ``BatchTopKSAE(top_k)`` counts ``top_k`` over the whole batch; raylens'
    ``top_k`` is per row (Bussmann et al. 2024), so the batch budget follows the batch size
    (a short last batch gets a proportionally smaller budget)."""
    x = args[0]
    module.top_k = max(1, min(int(module.k_per_row) * int(x.shape[0]), int(x.shape[0]) * int(module.nb_concepts)))


@register_concept_model
class BatchTopKSAEConceptModel(SAEConceptModel):
    """BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse
    Autoencoders", arXiv 2412.06410), wrapping ``overcomplete.sae.BatchTopKSAE``.

    Training keeps the ``top_k * batch_rows`` largest ReLU pre-activations of the whole batch
    (so rows get a variable number of latents, ``top_k`` on average); inference keeps the
    codes above a single threshold ``theta`` (a scalar in the normalised code space), the
    running average (momentum ``threshold_momentum``) of the batch's k-th largest value seen
    in training, so a row's code does not depend on the other rows of its batch.
    ``z (n_rows, nb_concepts)``; ``x_hat = (z @ D) * scale + mean``.

    overcomplete counts its ``top_k`` over the batch and keeps ``theta`` outside its
    ``state_dict``: raylens sets the batch budget from the per-row ``top_k`` before each
    forward (a pre-hook) and saves ``theta`` as the tensor ``batchtopk.threshold``. Streaming.

    Parameters (besides :class:`SAEConceptModel`'s):
        top_k: mean active latents per row (default ``max(nb_concepts // 16, 1)``).
        threshold_momentum: momentum of the running inference threshold, in ``[0, 1)``.
    """

    method = "batchtopk_sae"
    parameters = {
        "top_k": TOP_K,
        "threshold_momentum": Param(0.9, float, low=0, high=1, high_open=True,
                                    doc="momentum of the running inference threshold"),
    }

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import BatchTopKSAE

        sae = BatchTopKSAE(self.d_model, nb_concepts=self.nb_concepts, top_k=self.top_k,
                           threshold_momentum=self.threshold_momentum, device=self.device)
        sae.k_per_row = self.top_k
        sae.register_forward_pre_hook(_batchtopk_pre_hook)
        return sae

    @property
    def threshold(self) -> float:
        """The inference threshold ``theta`` (normalised code units)."""
        self._check_fitted()
        return float(self.sae.running_threshold)

    def _extra_sae_tensors(self) -> dict[str, Tensor]:
        return {"batchtopk.threshold": torch.as_tensor(self.sae.running_threshold, dtype=torch.float32).reshape(())}

    def _load_extra_sae_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "batchtopk.threshold" not in tensors:
            raise ValueError("batchtopk_sae state lacks tensor 'batchtopk.threshold'")
        self.sae.running_threshold = tensors["batchtopk.threshold"].reshape(()).to(self.device)


@register_concept_model
class JumpReLUSAEConceptModel(SAEConceptModel):
    """JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead: Improving
    Reconstruction Fidelity with JumpReLU Sparse Autoencoders", arXiv 2407.14435), wrapping
    ``overcomplete.sae.JumpSAE``.

    ``z_i = h_i * [h_i > theta_i]`` with ``h = ReLU(W_enc x_norm + b_enc)`` and a learned
    threshold per latent ``theta = exp(log_theta)`` ``(nb_concepts,)``; codes ``z`` are
    ``(n_rows, nb_concepts)`` and ``x_hat = (z @ D) * scale + mean`` with unit-norm atoms
    ``D (nb_concepts, d_model)``. Loss: reconstruction MSE plus
    ``l0_coef * mean_rows(L0(z)) / d_model`` (``l0_coef``: the fraction of variance traded for
    one active latent), the L0 and the thresholds trained by the paper's kernel
    pseudo-gradient (``kernel``, ``bandwidth`` in normalised code units). Streaming. State:
    SAE weights including the log-thresholds (``sae.thresholds``) and the fused dictionary.

    Parameters (besides :class:`SAEConceptModel`'s):
        l0_coef: L0 coefficient (see above).
        bandwidth: kernel bandwidth of the pseudo-gradient.
        kernel: overcomplete kernel name (``"rectangle"`` as in the paper, ``"silverman"``...;
            one of :data:`JUMP_KERNELS`).
    """

    method = "jumprelu_sae"
    parameters = {
        "l0_coef": Param(0.005, float, low=0, doc="L0 coefficient"),
        "bandwidth": Param(1e-2, float, low=0, low_open=True, doc="kernel bandwidth of the pseudo-gradient"),
        "kernel": Param("rectangle", str, choices=JUMP_KERNELS, doc="pseudo-gradient kernel"),
    }

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import JumpSAE

        return JumpSAE(self.d_model, nb_concepts=self.nb_concepts, kernel=self.kernel,
                       bandwidth=self.bandwidth, device=self.device)

    def penalty(self, sae, batch, pre_codes, codes, x_hat):
        from overcomplete.sae import heaviside

        l0 = heaviside(torch.relu(pre_codes), torch.exp(sae.thresholds), sae.kernel_fn, sae.bandwidth)
        return self.l0_coef * l0.sum(dim=1).mean() / batch.shape[1]

    @property
    def thresholds(self) -> Tensor:
        """Per-latent thresholds ``theta (nb_concepts,)`` in normalised code units."""
        self._check_fitted()
        return torch.exp(self.sae.thresholds.detach()).clone()


@register_concept_model
class MPSAEConceptModel(SAEConceptModel):
    """Matching-pursuit sparse autoencoder (MP-SAE: Costa et al. 2025, "From Flat to
    Hierarchical: Extracting Sparse Representations with Matching Pursuit", arXiv
    2506.03093; matching pursuit: Mallat & Zhang 1993), wrapping ``overcomplete.sae.MpSAE``.

    The encoder has no weights: ``top_k`` greedy steps each pick the atom most correlated
    with the residual ``r`` (start ``r = x_norm``), add ``<r, d_j>`` to code ``j`` and subtract
    it from ``r``. ``z (n_rows, nb_concepts)`` has at most ``top_k`` non-zeros (an atom can be
    picked twice); ``x_hat = (z @ D) * scale + mean`` with unit-norm atoms ``D``. The dictionary
    is trained through the pursuit by the shared SAE loop. Encoding is row-independent and
    deterministic. Streaming. State: the dictionary.

    Parameters (besides :class:`SAEConceptModel`'s):
        top_k: pursuit steps (default ``max(nb_concepts // 16, 1)``).
    """

    method = "mp_sae"
    parameters = {"top_k": TOP_K}

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import MpSAE

        return MpSAE(self.d_model, nb_concepts=self.nb_concepts, k=self.top_k, device=self.device)


@register_concept_model
class ArchetypalSAEConceptModel(SAEConceptModel):
    """Relaxed archetypal TopK SAE (RA-SAE: Fel et al. 2025, "Archetypal SAE: Adaptive and
    Stable Dictionary Learning for Concept Extraction in Large Vision Models", ICML 2025,
    arXiv 2502.12892), wrapping ``overcomplete.sae.RATopKSAE``.

    Encoder as :class:`TopKSAEConceptModel` (codes ``(n_rows, nb_concepts)``, at most
    ``top_k`` non-zeros per row, ``x_hat = (z @ D) * scale + mean``); the dictionary is
    constrained near the convex hull of data: ``D = exp(m) * (W C + Lambda)`` with candidate
    points ``C (nb_candidates, d_model)``, a row-stochastic ``W (nb_concepts, nb_candidates)``,
    a relaxation ``Lambda (nb_concepts, d_model)`` with row norms ``<= delta`` and a learned
    scale ``m``. ``C`` are the k-means centroids (scikit-learn KMeans, seeded, as in the
    paper) of the normalised rows buffered first (``norm_rows`` of a stream, a seeded sample
    in memory). Streaming. State: SAE weights (``C`` included) and the fused dictionary.

    Parameters (besides :class:`SAEConceptModel`'s):
        top_k: active latents per row (default ``max(nb_concepts // 16, 1)``).
        nb_candidates: number of centroids in ``C`` (default ``4 * nb_concepts``, at least
            ``nb_concepts``); the first buffered sample must have at least that many rows.
        delta: relaxation bound (normalised rows have a norm of about 1).

    Raises:
        ValueError: (fit) too few rows for ``nb_candidates``.
    """

    method = "archetypal_sae"
    parameters = {
        "top_k": TOP_K,
        "nb_candidates": Param(None, int, low="nb_concepts", derive=lambda nb_concepts: 4 * nb_concepts,
                               doc="k-means candidate points (default 4 * nb_concepts)"),
        "delta": Param(0.1, float, low=0, doc="relaxation bound"),
    }

    def _candidates(self, sample: Tensor) -> Tensor:
        if sample.shape[0] < self.nb_candidates:
            raise ValueError(f"archetypal_sae needs at least nb_candidates={self.nb_candidates} rows in its "
                             f"first sample, got {sample.shape[0]}")
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=self.nb_candidates, n_init=1, max_iter=100, random_state=self.seed)
        km.fit(sample.detach().cpu().numpy().astype("float64"))
        return torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=self.device)

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import RATopKSAE

        points = (torch.zeros(self.nb_candidates, self.d_model, device=self.device) if sample is None
                  else self._candidates(sample))
        return RATopKSAE(self.d_model, nb_concepts=self.nb_concepts, points=points, top_k=self.top_k,
                         delta=self.delta, use_multiplier=True, device=self.device)

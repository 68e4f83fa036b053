"""Sparse autoencoders: the one training step and the shared SAE base.

Every SAE family (:mod:`raylens.concepts.models.sae_variants`) wraps an ``overcomplete.sae``
module and trains it with the same loop (:class:`SAEConceptModel`, :func:`sae_train_step`);
all of them stream. overcomplete is imported only through
:func:`raylens._compat.import_overcomplete`, and only when an SAE module is built.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from raylens._compat import import_overcomplete
from raylens.concepts.models.base import ConceptModel
from raylens.concepts.models.params import Param, positive_int
from raylens.concepts.models.streaming import as_rows, chain, is_reiterable, progress_bar, rebatch, seeded
from raylens.concepts.models.streaming import take_head
from raylens.concepts.models.checkpoint import FitCheckpoint, FitState, optimizer_from_tensors, optimizer_to_tensors

__all__ = ["FitRun", "STEP_STATS", "SAEConceptModel", "TOP_K", "default_top_k", "sae_train_step"]

#: The statistics :func:`sae_train_step` returns, averaged per epoch in ``history``.
STEP_STATS = ("loss", "mse", "explained_variance", "l0")


@dataclass
class FitRun:
    """How one SAE training loop runs: where it starts (``state``, ``optimizer_state`` from a
    checkpoint), how many passes it makes, where it checkpoints, who observes its last epoch."""

    state: FitState = field(default_factory=FitState)
    optimizer_state: tuple[dict[str, Tensor], dict[str, Any]] | None = None
    n_passes: int | None = None
    checkpoint: FitCheckpoint | None = None
    observer: Any = None

logger = logging.getLogger(__name__)


def default_top_k(nb_concepts: int) -> int:
    """The default ``top_k`` of the TopK-style SAEs: ``max(nb_concepts // 16, 1)``."""
    return max(nb_concepts // 16, 1)


#: ``top_k`` of the TopK-style SAEs (active latents, or pursuit steps, per row).
TOP_K = Param(None, int, low=1, high="nb_concepts", derive=default_top_k,
              doc="active latents per row (default max(nb_concepts // 16, 1))")


def sae_train_step(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Tensor,
                   *, clip_grad: float | None = 1.0, penalty: Callable[..., Tensor] | None = None,
                   observe: Callable[[Tensor, Tensor, Tensor], None] | None = None) -> dict[str, float]:
    """One Adam (or any optimizer) step of an overcomplete SAE on one batch; the single
    training step that in-memory, streaming and distributed (Ray Train) training all call.

    Loss: mean squared reconstruction error ``mean((batch - x_hat)^2)`` over
    ``(batch_rows, d_in)``, plus ``penalty(sae, batch, pre_codes, codes, x_hat)`` when given
    (the sparsity term of L1 or JumpReLU SAEs; TopK-style SAEs need none: Gao et al. 2024,
    "Scaling and evaluating sparse autoencoders"; a model's own penalty is
    ``model.penalty``). Gradients are clipped to global norm ``clip_grad`` (None: no
    clipping). overcomplete's dictionary layer re-projects its atoms on the unit sphere at
    every training-mode forward.

    Args:
        sae: an overcomplete SAE (``forward(x) -> (pre_codes, codes, x_hat)``), put in
            training mode by this function.
        optimizer: optimizer over ``sae.parameters()``.
        batch: input rows ``(batch_rows, d_in)`` already in the SAE's input space (for a
            concept model, ``model.normalize(x)``).
        clip_grad: global gradient-norm clip.
        penalty: optional extra loss term (a scalar tensor).
        observe: called as ``observe(batch, codes, x_hat)`` (detached; ``codes (batch_rows,
            nb_concepts)`` and ``x_hat (batch_rows, d_in)`` of this step's forward pass, before
            the update) to compute metrics without a second forward pass.

    Returns:
        ``dict(loss=float, mse=float, explained_variance=float, l0=float)``: total loss and
        reconstruction loss before the step, explained variance of the batch (1 - SSE/SST,
        <= 1, higher is better) and the mean number of active codes per row.

    Raises:
        ValueError: batch is not 2-D or the loss is not finite.
    """
    if batch.ndim != 2:
        raise ValueError(f"batch must be (batch_rows, d_in), got {tuple(batch.shape)}")
    sae.train()
    optimizer.zero_grad(set_to_none=True)
    pre_codes, codes, x_hat = sae(batch)
    err = (batch - x_hat).pow(2)
    mse = err.mean()
    loss = mse if penalty is None else mse + penalty(sae, batch, pre_codes, codes, x_hat)
    if not torch.isfinite(loss):
        raise ValueError(f"non-finite SAE loss {loss.item()}")
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip_grad)
    optimizer.step()
    with torch.no_grad():
        if observe is not None:
            observe(batch.detach(), codes.detach(), x_hat.detach())
        sse = err.sum()
        sst = (batch - batch.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return {
            "loss": float(loss),
            "mse": float(mse),
            "explained_variance": float(1 - sse / sst),
            "l0": float((codes != 0).sum(dim=1).float().mean()),
        }


class SAEConceptModel(ConceptModel):
    """Shared base of the sparse-autoencoder concept models (overcomplete ``SAE`` subclasses).

    ``z = encoder((x - mean) / scale)`` of shape ``(n_rows, nb_concepts)``,
    ``x_hat = (z @ D) * scale + mean`` with the dictionary ``D (nb_concepts, d_model)`` of the
    SAE in the normalised space; ``mean`` (``(d_model,)``) is a fixed pre-encoder/decoder bias
    estimated on the first rows. Linear encoders start as ``D^T`` (Gao et al. 2024).

    Training (one loop for every SAE): Adam on the mean squared reconstruction error of
    normalised rows plus the method's :meth:`penalty`, in minibatches of ``batch_size`` rows,
    via :func:`sae_train_step`. :meth:`fit` runs ``epochs`` seeded-shuffled passes over an
    in-memory tensor; :meth:`fit_stream` runs one pass over a one-shot iterator (a
    generator), or ``epochs`` passes over a re-iterable (a list, a dataset), re-cutting the
    stream into ``batch_size``-row batches (no shuffling across batches: shuffle upstream).
    Normalisation statistics are estimated on the first ``norm_rows`` rows of the stream.
    All SAEs stream (``streaming = True``).

    Construction is cheap: the overcomplete module (:attr:`sae`) is built by ``fit``, by
    loading, or on first access (untrained, seeded: the initialisation ``fit`` starts from).

    Parameters (besides :class:`ConceptModel`'s):
        lr: Adam learning rate.
        epochs: passes over the data.
        batch_size: rows per training step.
        clip_grad: global gradient-norm clip (0 disables).

    State: the SAE's ``state_dict`` (``sae.*`` tensors), the fused dictionary of the fit
    (``dictionary``) and whatever a subclass adds (e.g. BatchTopK's inference threshold),
    plus the normalisation.

    Subclasses set ``method`` and implement :meth:`_build_sae` (and, when they need them,
    :meth:`penalty`, :meth:`_extra_sae_tensors`, :meth:`_load_extra_sae_tensors`).
    """

    streaming = True
    resumable = True
    parameters = {
        "lr": Param(2e-3, float, low=0, low_open=True, doc="Adam learning rate"),
        "epochs": positive_int(10, "passes over the data"),
        "batch_size": positive_int(256, "rows per training step"),
        "clip_grad": Param(1.0, float, low=0, doc="global gradient-norm clip (0 disables)"),
    }

    _sae: torch.nn.Module | None = None
    _dict: Tensor | None = None  # fused dictionary (nb_concepts, d_model)
    history: Sequence[dict[str, float]] = ()

    @property
    def sae(self) -> torch.nn.Module:
        """The overcomplete SAE module (built untrained, seeded, on first access before a fit)."""
        if self._sae is None:
            self._sae = self._new_sae(None)
        return self._sae

    @sae.setter
    def sae(self, module: torch.nn.Module) -> None:
        self._sae = module

    # ---- construction

    @abc.abstractmethod
    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        """A fresh overcomplete SAE (called under a seeded RNG). ``sample``: normalised rows
        ``(n_rows, d_model)`` of the training data (None when building a placeholder)."""

    def _new_sae(self, sample: Tensor | None) -> torch.nn.Module:
        import_overcomplete()
        with seeded(self.seed):
            sae = self._build_sae(sample)
        # Gao et al. 2024: initialise a linear encoder as the transpose of the (unit-norm) decoder.
        linear = self._encoder_linear(sae)
        if linear is not None:
            with torch.no_grad():
                sae.train()
                D = sae.get_dictionary().detach()
                linear.weight.copy_(D / D.norm(dim=1, keepdim=True).clamp_min(1e-8))
                linear.bias.zero_()
        return sae

    @staticmethod
    def _encoder_linear(sae: torch.nn.Module) -> torch.nn.Linear | None:
        block = getattr(sae.encoder, "final_block", None)
        if isinstance(block, torch.nn.Sequential) and isinstance(block[0], torch.nn.Linear):
            return block[0]
        return None

    # ---- training

    def penalty(self, sae: torch.nn.Module, batch: Tensor, pre_codes: Tensor, codes: Tensor,
                x_hat: Tensor) -> Tensor | None:
        """Sparsity term added to the reconstruction loss (None: none, the default)."""
        return None

    def _penalty_fn(self) -> Callable[..., Tensor] | None:
        return None if type(self).penalty is SAEConceptModel.penalty else self.penalty

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the SAE parameters with this model's ``lr`` (for external training loops)."""
        for p in self.sae.parameters():
            p.requires_grad_(True)
        return torch.optim.Adam(self.sae.parameters(), lr=self.lr)

    def train_step(self, optimizer: torch.optim.Optimizer, batch_norm: Tensor,
                   observe: Callable[[Tensor, Tensor, Tensor], None] | None = None) -> dict[str, float]:
        """:func:`sae_train_step` with this model's penalty and clipping, on normalised rows
        ``(batch_rows, d_model)`` (``observe`` as there)."""
        return sae_train_step(self.sae, optimizer, batch_norm, clip_grad=self.clip_grad or None,
                              penalty=self._penalty_fn(), observe=observe)

    def _train_batches(self, batch_passes: Iterable[Iterable[Tensor]], progress: bool,
                       run: FitRun | None = None) -> None:
        """Train over several passes; each element of ``batch_passes`` yields normalised batches
        (the passes from ``run.state.epoch`` on, the first one already past ``run.state.batch``)."""
        with torch.enable_grad():  # callers may be inside torch.no_grad()
            self._train_loop(batch_passes, progress, run or FitRun())

    def _train_loop(self, batch_passes: Iterable[Iterable[Tensor]], progress: bool, run: FitRun) -> None:
        optimizer = self.make_optimizer()
        if run.optimizer_state is not None:
            optimizer_from_tensors(optimizer, *run.optimizer_state)
        state = run.state
        t0 = time.perf_counter()
        for batches in batch_passes:
            last = run.n_passes is not None and state.epoch == run.n_passes - 1
            observe = self._observer(run.observer) if last and run.observer is not None else None
            for batch in progress_bar(batches, progress, f"{self.method} epoch {state.epoch + 1}"):
                stats = self.train_step(optimizer, batch, observe)
                for k in STEP_STATS:
                    state.sums[k] = state.sums.get(k, 0.0) + stats[k]
                state.batch += 1
                state.step += 1
                state.epoch_rows += batch.shape[0]
                if run.checkpoint is not None and state.step % run.checkpoint.every == 0:
                    self._save_checkpoint(run, optimizer)
            self._end_epoch(state, t0)
        if state.step == 0:
            raise ValueError("no training batch: empty activations/stream")
        self.history = list(state.history)
        self._finalize()

    def _observer(self, observer: Any) -> Callable[[Tensor, Tensor, Tensor], None]:
        """``observer.update(x, x_hat, z)`` in the original activation space, fed from normalised rows."""
        return lambda b, z, x_hat: observer.update(self.denormalize(b), self.denormalize(x_hat), z)

    def _end_epoch(self, state: FitState, t0: float) -> None:
        """Close the epoch in progress: its history record, then the counters of the next one."""
        if state.batch:
            n = state.batch
            record = {k: state.sums.get(k, 0.0) / n for k in STEP_STATS} | {"epoch": state.epoch + 1, "steps": n}
            state.history.append(record)
            self.n_fit_rows = state.epoch_rows
            logger.info("%s epoch %d: loss %.4g, batch EV %.3f, L0 %.1f, %.1fs", self.method,
                        state.epoch + 1, record["loss"], record["explained_variance"], record["l0"],
                        time.perf_counter() - t0)
        state.epoch += 1
        state.batch, state.epoch_rows, state.sums = 0, 0, {}
        self.history = list(state.history)

    def _save_checkpoint(self, run: FitRun, optimizer: torch.optim.Optimizer) -> None:
        state = run.state
        tensors = {"norm.mean": self._mean, "norm.scale": self._scale.reshape(()), "rng.cpu": torch.get_rng_state(),
                   **{f"sae.{k}": v for k, v in self.sae.state_dict().items()}}
        try:
            tensors.update(self._extra_sae_tensors())
        except (TypeError, RuntimeError):  # e.g. BatchTopK before its first threshold estimate
            pass
        if hasattr(run.observer, "state_tensors"):
            tensors.update({f"observer.{k}": v for k, v in run.observer.state_tensors().items()})
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        run.checkpoint.save({**tensors, **opt_tensors}, {"step": state.step, "state": state.to_json(),
                                                     "optimizer": opt_meta})

    def _resume(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> FitRun:
        """Become the half-trained model of a checkpoint; returns the loop state to go on from."""
        self._mean = tensors["norm.mean"].to(self.device)
        self._scale = tensors["norm.scale"].reshape(()).to(self.device)
        self.sae = self._new_sae(None)
        self.sae.load_state_dict({k[len("sae."):]: v.to(self.device) for k, v in tensors.items()
                                  if k.startswith("sae.")}, strict=True)
        extra = {k: v for k, v in tensors.items() if not k.startswith(("sae.", "norm.", "optim.", "rng.", "observer."))}
        if extra:
            self._load_extra_sae_tensors(extra)
        torch.set_rng_state(tensors["rng.cpu"])
        return FitRun(state=FitState.from_json(meta["state"]), optimizer_state=(tensors, meta["optimizer"]))

    def _finalize(self) -> None:
        """Freeze: eval mode, parameters without gradients, fused dictionary cached."""
        for p in self.sae.parameters():
            p.requires_grad_(False)
        # overcomplete's dictionary layers fuse (normalise) their dictionary when switched to
        # eval mode and keep that copy out of their state_dict: we keep our own copy and save it.
        self.sae.eval()
        with torch.no_grad():
            self._dict = self.sae.get_dictionary().detach().clone()
        self._fitted = True

    def fit(self, activations: Tensor) -> SAEConceptModel:
        """Train on activations ``(n_rows, d_model)`` in memory: ``epochs`` seeded-shuffled
        passes in minibatches of ``batch_size`` rows (see the class docstring).

        Returns:
            self.

        Raises:
            ValueError: wrong shape or no rows.
        """
        x = as_rows(activations, self.d_model).detach()
        n = x.shape[0]
        if n == 0:
            raise ValueError("fit got no rows")
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=gen)[: self.norm_rows]
        self.set_normalization(x[idx])
        x_norm = self.normalize(x)
        self.sae = self._new_sae(x_norm[idx.to(x_norm.device)])

        def passes():
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen).to(x_norm.device)
                yield (x_norm[perm[i:i + self.batch_size]] for i in range(0, n, self.batch_size))

        self._train_batches(passes(), progress=False)
        self.n_fit_rows = n
        return self

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True, checkpoint: FitCheckpoint | None = None,
                   observer: Any = None) -> SAEConceptModel:
        """Train on a stream of batches ``(batch, d_model)`` with bounded memory.

        The first ``norm_rows`` rows are buffered to estimate the normalisation (and, for
        methods that need data at construction such as the archetypal SAE, to build the
        SAE), then training starts on them and continues over the stream, re-cut into
        ``batch_size``-row batches. A one-shot iterator gets one pass; a re-iterable gets
        ``epochs`` passes (``batches.set_epoch(e)`` is called before pass ``e`` when the stream
        has it, as :class:`raylens.io.readers.ActivationStream` does, so pass ``e`` has the
        same order in a fresh and in a resumed fit).

        Args:
            batches: activation batches ``(batch, d_model)``.
            progress: show a progress bar.
            checkpoint: save the training state every ``checkpoint.every`` steps (SAE and
                optimizer tensors, normalisation, step / epoch / batch position, RNG) and, when
                it holds one, resume from its last checkpoint: the batches of the epoch in
                progress that were already trained on are read again and skipped (the stream
                order of an epoch is reproducible), so a resumed fit trains on exactly the
                batches the uninterrupted one would.
            observer: an object whose ``update(x, x_hat, z)`` is called on every batch of the
                last epoch (activations and reconstructions ``(batch, d_model)`` in the original
                space, codes ``(batch, nb_concepts)``), taken from the forward pass of that
                batch's training step, before its update (how training metrics are computed
                without a second pass), e.g. a
                :class:`raylens.concepts.metrics.ReconstructionAccumulator`; when it has
                ``state_tensors()`` / ``load_state_tensors(tensors)``, its state is checkpointed
                and resumed with the fit's.

        Returns:
            self.

        Raises:
            ValueError: wrong batch shape or empty stream.
        """
        reiterable = is_reiterable(batches)
        n_passes = self.epochs if reiterable else 1
        if not reiterable and self.epochs > 1:
            logger.info("%s.fit_stream: the stream is a one-shot iterator, training one pass "
                        "(epochs=%d needs a re-iterable such as a list or dataset)", self.method, self.epochs)
        set_epoch = getattr(batches, "set_epoch", None)

        def cut(epoch: int) -> Iterator[Tensor]:
            if set_epoch is not None:
                set_epoch(epoch)
            return rebatch(batches, self.batch_size, self.d_model, self.device)

        loaded = checkpoint.load() if checkpoint is not None and reiterable else None
        if loaded is not None:
            run = self._resume(*loaded)
            logger.info("%s: resuming from the checkpoint at step %d (epoch %d, batch %d)", self.method,
                        run.state.step, run.state.epoch + 1, run.state.batch)
            first_pass = islice(cut(run.state.epoch), run.state.batch, None)
        else:
            run = FitRun()
            first_pass = cut(0)
            head = take_head(first_pass, self.norm_rows)
            if not head:
                raise ValueError("fit_stream got an empty stream")
            head_x = torch.cat(head)
            self.set_normalization(head_x)
            self.sae = self._new_sae(self.normalize(head_x))
            first_pass = chain(head, first_pass)
        run.n_passes, run.checkpoint, run.observer = n_passes, checkpoint, observer
        if loaded is not None and hasattr(observer, "load_state_tensors"):
            saved = {k[len("observer."):]: v for k, v in loaded[0].items() if k.startswith("observer.")}
            if saved:
                observer.load_state_tensors(saved)

        start = run.state.epoch

        def passes():
            yield (self.normalize(b) for b in first_pass)
            for epoch in range(start + 1, n_passes):
                yield (self.normalize(b) for b in cut(epoch))

        self._train_batches(passes(), progress=progress, run=run)
        return self

    # ---- inference

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        _, z = self.sae.encode(x_norm)
        return z

    def _decode_normalized(self, z: Tensor) -> Tensor:
        return z @ self._dict

    def _normalized_dictionary(self) -> Tensor:
        return self._dict

    # ---- state

    def _extra_sae_tensors(self) -> dict[str, Tensor]:
        """State outside the SAE's ``state_dict`` that inference needs (override)."""
        return {}

    def _load_extra_sae_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`_extra_sae_tensors` wrote (called before freezing)."""

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors["dictionary"] = self._dict
        tensors.update(self._extra_sae_tensors())
        return tensors

    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "dictionary" not in tensors:
            raise ValueError(f"{self.method} state lacks tensor 'dictionary'")
        sae_state = {k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")}
        self.sae.load_state_dict(sae_state, strict=True)
        self._load_extra_sae_tensors({k: v for k, v in tensors.items()
                                      if not k.startswith("sae.") and k != "dictionary"})
        self._finalize()
        self._dict = tensors["dictionary"].to(self.device)  # the exact fused dictionary of the fit
        # encoders that read the SAE's fused dictionary (matching pursuit) must see the same one
        if hasattr(self.sae.dictionary, "_fused_dictionary"):
            self.sae.dictionary._fused_dictionary = self._dict

    def _extra_config(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def _load_extra_config(self, extra: dict[str, Any]) -> None:
        self.history = list(extra.get("history", []))

"""The network job's configuration: the logit and tuned lenses over a corpus (which layers, how
many tokens, the tuned lens' training slice), causal head gating (seeds, documents) and the
report. Checks that need the model's config (its layer count) run in
:meth:`NetworkJobConfig.check_model_fields`, called by `raylens.config.preflight.preflight`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raylens.config.common import ConfigError, CorpusConfig, ModelConfig, ResourcesConfig, Section, field_error

#: the lenses the job knows (`raylens.network.lens`): nostalgebraist's logit lens, Belrose et al.'s tuned lens
LENSES = ("logit", "tuned")


def distinct(values: list, what: str) -> list:
    """``values`` when it is non-empty without repeats.

    Raises:
        ValueError: ``list each <what>; got <values>``.
    """
    if not values or len(set(values)) != len(values):
        raise ValueError(f"list each {what}; got {values}")
    return values


class NetworkCorpusConfig(CorpusConfig):
    """Which texts run through the network (a few dozen movie reviews by default)."""

    limit: int | None = Field(16, gt=0, description="maximum number of documents")


class LensConfig(Section):
    """The logit lens (nostalgebraist 2020) and the tuned lens (Belrose et al. 2023) over the corpus."""

    lenses: list[Literal["logit", "tuned"]] = Field(default_factory=lambda: list(LENSES),
                                                    description="lenses run over every document")
    layers: list[int] | None = Field(
        None, description="layers kept in the lens table (0 = the embeddings, n_layers = the model's output); "
                          "null = every layer. Checked against the model's config before Ray starts")
    max_tokens: int = Field(16, gt=0, description="longer documents are cut to their first max_tokens tokens "
                                                  "(recorded in issues.parquet)")
    batch_size: int = Field(8, gt=0, description="documents per forward pass")
    shard_size: int = Field(8, gt=0, description="documents per shard (the unit of resume)")
    train_docs: int = Field(8, ge=0, description="the tuned lens is fitted on the first train_docs non-empty "
                                                 "documents; lens_curves.parquet is over the other (held-out) ones")
    tuned_steps: int = Field(4, gt=0, description="Adam steps of the tuned lens' fit (every layer at each step)")
    tuned_tokens_per_step: int = Field(48, gt=0, description="tokens drawn from the training slice per step")
    tuned_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the translators")

    @field_validator("lenses")
    @classmethod
    def _lenses_once(cls, v: list[str]) -> list[str]:
        return distinct(v, f"lens, at least one of {LENSES}")

    @model_validator(mode="after")
    def _tuned_needs_training(self) -> "LensConfig":
        if "tuned" in self.lenses and self.train_docs == 0:
            raise ValueError("the tuned lens needs train_docs > 0 documents to be fitted on")
        return self

    def tuned_fit_params(self) -> dict[str, Any]:
        """Keyword arguments of `raylens.network.lens.TunedLens.fit`."""
        return {"steps": self.tuned_steps, "tokens_per_step": self.tuned_tokens_per_step, "lr": self.tuned_lr,
                "max_tokens": self.max_tokens, "batch_size": self.batch_size}


class HeadGatingConfig(Section):
    """Causal head gating (Nam et al., NeurIPS 2025) on the next-token loss of a slice of the
    corpus, once per seed (`raylens.network.heads.CausalHeadGating`)."""

    enabled: bool = True
    seeds: list[int] = Field(default_factory=lambda: [0, 1], description="one set of three fits per seed")
    n_docs: int = Field(4, gt=0, description="documents (the first non-empty ones) the gates are fitted on")
    steps: int = Field(5, gt=0, description="Adam steps of the unregularised fit")
    reg_steps: int = Field(5, gt=0, description="Adam steps of each regularised fit")
    lam: float = Field(0.01, gt=0, description="regulariser weight per head (nats of task loss per gate)")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the gate logits")
    threshold: float = Field(0.5, gt=0, lt=1, description="gate value separating open from closed")
    max_tokens: int = Field(16, gt=1, description="tokens kept per document")
    batch_size: int = Field(4, gt=0, description="documents per optimisation step")

    @field_validator("seeds")
    @classmethod
    def _seeds_once(cls, v: list[int]) -> list[int]:
        return distinct(v, "seed, at least one")

    def fit_params(self) -> dict[str, Any]:
        """Keyword arguments of `raylens.network.corpus.head_gating_roles` besides the texts and seeds."""
        return self.model_dump(exclude={"enabled", "seeds", "n_docs"})


class NetworkReportConfig(Section):
    """The HTML report."""

    doc_id: int | None = Field(None, description="document shown layer by layer; null = the first held-out one")
    max_positions: int = Field(32, gt=0, description="positions of that document shown")


class NetworkJobConfig(Section):
    """The whole network job: lenses and head roles over a corpus."""

    output_uri: str = Field("raylens-out/network", description="local folder or pyarrow URI (s3://...)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: NetworkCorpusConfig = Field(default_factory=NetworkCorpusConfig)
    lens: LensConfig = Field(default_factory=LensConfig)
    head_gating: HeadGatingConfig = Field(default_factory=HeadGatingConfig)
    report: NetworkReportConfig = Field(default_factory=NetworkReportConfig)
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_workers=2),
                                       description="two model-worker actors by default")

    @model_validator(mode="after")
    def _held_out_documents_left(self) -> "NetworkJobConfig":
        limit, train = self.corpus.limit, self.lens.train_docs
        if "tuned" in self.lens.lenses and limit is not None and train >= limit:
            raise ValueError(f"lens.train_docs ({train}) leaves no held-out document of corpus.limit ({limit})")
        return self

    def check_method_params(self) -> None:
        """Nothing to check beyond the fields (called by :func:`~raylens.config.load_config`): the
        lens and head-gating parameters are typed fields of this config, no registry's."""

    def check_model_fields(self, skeleton: Any) -> None:
        """The checks that need the model's config (``skeleton``: the model on the meta device, from
        `raylens.config.preflight.check_model`): a causal LM (the lenses read its unembedding) and
        ``lens.layers`` within ``[0, num_hidden_layers]``.

        Raises:
            ConfigError: naming ``model.name`` or ``lens.layers``.
        """
        if skeleton.get_output_embeddings() is None:
            raise ConfigError(field_error(f"model.name: {self.model.name!r} has no unembedding (a causal LM is "
                                          f"needed for the lenses; got {type(skeleton).__name__})"))
        n = int(skeleton.config.num_hidden_layers)
        bad = [layer for layer in self.lens.layers or [] if not 0 <= layer <= n]
        if bad:
            raise ConfigError(field_error(f"lens.layers: {bad} out of range: the model has {n} layers "
                                          f"(0 = embeddings ... {n} = the model's output)"))

    def job_key(self) -> dict[str, Any]:
        """The fields that determine the rows (must match when a run resumes into an output URI)."""
        return {"model": self.model.model_dump(), "corpus": self.corpus.model_dump(),
                "lens": self.lens.model_dump(exclude={"batch_size"}), "head_gating": self.head_gating.model_dump()}


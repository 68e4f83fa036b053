"""The attribution job's configuration: methods and their parameters, targets, metrics, gallery."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raylens.config.common import CorpusConfig, ModelConfig, ResourcesConfig, Section, method_params_error


class AttributionCorpusConfig(CorpusConfig):
    """Which texts to explain (and, optionally, what to explain in each)."""

    target_column: str | None = Field(
        None, description="column holding each text's target: class index/name, or the output text to explain")


class AttributionSettings(Section):
    """Which attribution methods run, and how."""

    methods: list[str] = Field(default_factory=lambda: ["Occlusion", "IntegratedGradients"],
                               description="names from raylens.attributions.METHODS")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                              description="per-method options, e.g. {IntegratedGradients: {n_steps: 32}}")
    granularity: Literal["token", "word", "sentence"] = "word"
    inference_mode: Literal["logits", "softmax", "log_softmax"] = "logits"
    targets: Literal["predicted", "column", "all_classes"] = Field(
        "predicted", description="predicted class / greedy generation; the target column; every class")
    max_new_tokens: int = Field(10, gt=0, description="tokens generated when a causal LM explains its own output")
    max_tokens: int = Field(256, gt=0, description="token limit of a document (causal LM: input + output)")
    too_long: Literal["error", "truncate"] = Field(
        "error", description="a longer document is recorded as an error row, or cut to max_tokens")
    batch_size: int = Field(32, gt=0, description="model rows per forward pass")
    shard_size: int = Field(25, gt=0, description="documents per output shard (the unit of resume)")
    docs_per_call: int = Field(8, gt=0, description="documents explained together (packed into shared batches)")
    seed: int = 0

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, v: list[str]) -> list[str]:
        from raylens.attributions.methods import METHODS

        unknown = [m for m in v if m not in METHODS]
        if unknown or not v:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; available: {sorted(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a method is listed twice: {v}")
        return v

    @model_validator(mode="after")
    def _params_for_listed(self) -> "AttributionSettings":
        extra = [m for m in self.params if m not in self.methods]
        if extra:
            raise ValueError(f"params given for method(s) not in methods: {extra}")
        return self


class FaithfulnessConfig(Section):
    """Per-row faithfulness metrics (deletion, insertion, AOPC comprehensiveness and sufficiency)."""

    enabled: bool = True
    n_steps: int = Field(10, gt=0, description="points on the deletion/insertion curves minus one")
    n_random: int = Field(3, ge=0, description="random rankings averaged for the baseline")
    batch_size: int = Field(32, gt=0)


class GalleryConfig(Section):
    """The HTML gallery."""

    examples_per_kind: int = Field(3, ge=0, description="best, worst and random examples per method")
    top_words: int = Field(15, gt=0, description="words shown per method, class and direction")
    min_word_count: int = Field(3, gt=0, description="a word must occur this often to be ranked")


class AttributionJobConfig(Section):
    """The whole attribution job."""

    output_uri: str = Field("raylens-out/attributions", description="local folder or pyarrow URI (s3://...)")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="minilm-movie-sentiment"))
    corpus: AttributionCorpusConfig = Field(default_factory=AttributionCorpusConfig)
    attribution: AttributionSettings = Field(default_factory=AttributionSettings)
    metrics: FaithfulnessConfig = Field(default_factory=FaithfulnessConfig)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _targets_need_column(self) -> "AttributionJobConfig":
        if self.attribution.targets == "column" and not self.corpus.target_column:
            raise ValueError("attribution.targets is 'column' but corpus.target_column is not set")
        return self

    def check_method_params(self) -> None:
        """Check every ``attribution.params.<method>`` against the method's declared parameters and
        ranges, without a model (called by :func:`~raylens.config.load_config`).

        Raises:
            ConfigError: naming ``attribution.params.<method>.<name>``.
        """
        from raylens.attributions.methods import check_params

        for method in self.attribution.methods:
            try:
                check_params(method, self.attribution.params.get(method, {}))
            except ValueError as exc:
                raise method_params_error("attribution", method, exc) from None

    def job_key(self) -> dict[str, Any]:
        """The fields that determine the rows (must match when a run resumes into an output URI)."""
        a = self.attribution.model_dump()
        a.pop("docs_per_call")
        a.pop("batch_size")
        return {"model": self.model.model_dump(), "corpus": self.corpus.model_dump(), "attribution": a,
                "metrics": self.metrics.model_dump(exclude={"batch_size"})}

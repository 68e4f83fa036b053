"""The concept job's configuration (pydantic), validated whole before any Ray work starts.

Every section has defaults that run the built-in offline example: SmolLM2-135M over a
few hundred movie reviews. Unknown keys are errors (a typo must not pass silently), and
a validation error names the field path, e.g. ``extraction.granularity``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylens.models.split import GRANULARITIES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    """Which model to explain."""

    name: str = Field("smollm2-135m", description="built-in name, local folder or hub id")
    task: Literal["causal_lm", "sequence_classification", "base"] | None = Field(
        None, description="override the task read from the model config")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class CorpusConfig(_Section):
    """Which texts to run through the model."""

    source: str = Field("movie-reviews", description="built-in name, Parquet/CSV/JSONL path, or datasets name")
    text_column: str = "text"
    label_column: str | None = None
    limit: int | None = Field(300, gt=0, description="maximum number of documents")
    shuffle_seed: int | None = Field(0, description="seeded random sample of `limit` rows; null = first rows")


class ExtractionConfig(_Section):
    """Where to split the model and how to pool activations."""

    split_point: int | str = Field(15, description="layer index or module path (e.g. model.layers.15)")
    granularity: str = Field("token", description=f"one of {GRANULARITIES}")
    max_tokens: int = Field(128, gt=0, description="longer documents are truncated (recorded)")
    batch_size: int = Field(16, gt=0, description="documents per forward pass")
    activation_dtype: Literal["float16", "float32"] = "float16"
    shard_size: int = Field(50, gt=0, description="documents per output shard (unit of resume)")
    exclude_first_tokens: int = Field(
        1, ge=0, description="leave out the first token positions (the attention sink of decoders)")

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if v not in GRANULARITIES:
            raise ValueError(f"must be one of {GRANULARITIES}, got {v!r}")
        return v


class ConceptsConfig(_Section):
    """The concept model learned on the activations."""

    method: str = Field("topk_sae", description="concept model (see raylens.concepts.available_methods())")
    nb_concepts: int = Field(64, gt=0)
    params: dict[str, Any] = Field(default_factory=lambda: {"top_k": 8, "epochs": 10},
                                   description="method parameters (e.g. top_k, lr, epochs, seed)")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of documents held out for metrics")
    batch_rows: int = Field(1024, gt=0, description="activation rows per training batch")

    @model_validator(mode="after")
    def _method_known(self) -> "ConceptsConfig":
        from raylens.concepts.models import available_methods

        if self.method not in available_methods():
            raise ValueError(f"concepts.method {self.method!r} unknown; available: {available_methods()}")
        return self


class LabelsConfig(_Section):
    """LLM labels through any OpenAI-compatible endpoint, and their Delphi scores."""

    enabled: bool = True
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1; null = start a local server")
    serve_model: str = Field("smollm2-135m", description="model served on loopback when base_url is null")
    model: str | None = Field(None, description="model name sent to the endpoint (default: the served one)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    max_concepts: int = Field(32, ge=0, description="label the most important N concepts")
    max_concurrency: int = Field(4, gt=0, description="requests in flight (the local server uses 1)")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout in seconds")
    n_examples: int = Field(8, gt=0, description="top-activating examples in a label prompt")
    max_tokens: int = Field(24, gt=0)
    example_sampling: Literal["top", "top+quantile", "top+random"] = Field(
        "top", description="label prompt examples: the top ones only; or also `n_sampled_examples` weaker "
                           "activating ones from concepts/sampled_examples.parquet, spread over the activation "
                           "quantiles (top+quantile) or drawn at random (top+random)")
    n_sampled_examples: int = Field(4, ge=0, description="sampled examples added to a label prompt (top+...)")
    score_max_concepts: int = Field(
        4, ge=0, description="score the labels of the most important N labelled concepts (Delphi detection and "
                             "fuzzing; one request per example, about 0.7 s each with the local 135M server on 2 CPU "
                             "cores); 0 = no scoring")
    score_n_activating: int = Field(3, ge=0, description="activating excerpts per concept for detection")
    score_n_non_activating: int = Field(3, ge=0, description="non-activating excerpts per concept for detection")
    score_n_fuzzing: int = Field(4, ge=0, description="activating excerpts per concept for fuzzing")
    score_sampling: Literal["quantiles", "top"] = Field(
        "quantiles", description="how scoring draws activating examples from those the labeler did not see")
    score_examples_per_prompt: int = Field(1, gt=0, description="excerpts per scoring request (1: small models)")
    score_max_tokens: int = Field(6, gt=0, description="generation budget of one scoring reply")


class InterpretationConfig(_Section):
    """How concepts are interpreted."""

    top_k_examples: int = Field(10, gt=0)
    vocab_top_k: int = Field(10, gt=0)
    context_chars: int = Field(120, ge=0)
    sample_pool_size: int = Field(
        256, gt=0, description="activating rows kept per concept (a seeded uniform reservoir) to sample from")
    sample_quantiles: int = Field(5, gt=0, description="activation bins of concepts/sampled_examples.parquet")
    sampled_per_quantile: int = Field(
        4, ge=0, description="examples per bin in concepts/sampled_examples.parquet; 0 = no file")
    non_activating_per_concept: int = Field(
        20, ge=0, description="runs of text where a concept does not fire, kept per concept in "
                              "concepts/non_activating.parquet (the negatives of label scoring); 0 = none")
    non_activating_min_chars: int = Field(120, ge=1, description="shortest such run (characters)")
    labels: LabelsConfig = Field(default_factory=LabelsConfig)

    @model_validator(mode="after")
    def _sampling_needs_samples(self) -> "InterpretationConfig":
        lab = self.labels
        if lab.enabled and lab.example_sampling != "top" and lab.n_sampled_examples and not self.sampled_per_quantile:
            raise ValueError(f"labels.example_sampling is {lab.example_sampling!r} but sampled_per_quantile is 0 "
                             "(no sampled examples are kept)")
        return self


class ImportanceConfig(_Section):
    """Concept-to-output gradients."""

    enabled: bool = True
    n_samples: int = Field(64, gt=0, description="documents averaged over")
    batch_size: int = Field(8, gt=0)


class ResourcesConfig(_Section):
    """Ray resources."""

    num_workers: int = Field(1, gt=0, description="model-worker actors (one model each)")
    gpus_per_worker: float = Field(0, ge=0, description=">1 shards one model over several GPUs")
    cpus_per_worker: float = Field(1, gt=0)
    trainer_gpus: float = Field(0, ge=0)
    ray_address: str | None = Field(None, description="Ray address; null = join a running cluster or start a local one")


class ConceptJobConfig(_Section):
    """The whole concept job."""

    output_uri: str = Field("raylens-out/default", description="local folder or pyarrow URI (s3://...)")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    concepts: ConceptsConfig = Field(default_factory=ConceptsConfig)
    interpretation: InterpretationConfig = Field(default_factory=InterpretationConfig)
    importance: ImportanceConfig = Field(default_factory=ImportanceConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    def extraction_key(self) -> dict[str, Any]:
        """The fields that determine the documents and activation shards (must match on resume)."""
        return {"model": self.model.model_dump(), "corpus": self.corpus.model_dump(),
                "extraction": {k: v for k, v in self.extraction.model_dump().items() if k != "batch_size"}}


class AttributionCorpusConfig(CorpusConfig):
    """Which texts to explain (and, optionally, what to explain in each)."""

    target_column: str | None = Field(
        None, description="column holding each text's target: class index/name, or the output text to explain")


class AttributionSettings(_Section):
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


class FaithfulnessConfig(_Section):
    """Per-row faithfulness metrics (deletion, insertion, AOPC comprehensiveness and sufficiency)."""

    enabled: bool = True
    n_steps: int = Field(10, gt=0, description="points on the deletion/insertion curves minus one")
    n_random: int = Field(3, ge=0, description="random rankings averaged for the baseline")
    batch_size: int = Field(32, gt=0)


class GalleryConfig(_Section):
    """The HTML gallery."""

    examples_per_kind: int = Field(3, ge=0, description="best, worst and random examples per method")
    top_words: int = Field(15, gt=0, description="words shown per method, class and direction")
    min_word_count: int = Field(3, gt=0, description="a word must occur this often to be ranked")


class AttributionJobConfig(_Section):
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

    def job_key(self) -> dict[str, Any]:
        """The fields that determine the rows (must match when a run resumes into an output URI)."""
        a = self.attribution.model_dump()
        a.pop("docs_per_call")
        a.pop("batch_size")
        return {"model": self.model.model_dump(), "corpus": self.corpus.model_dump(), "attribution": a,
                "metrics": self.metrics.model_dump(exclude={"batch_size"})}


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad field."""


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                cls: type[BaseModel] | None = None) -> Any:
    """Read a YAML config (or the defaults), apply dotted ``overrides``, validate.

    Args:
        path: YAML file; ``None`` gives the built-in defaults.
        overrides: e.g. ``{"corpus.limit": 50, "output_uri": "/tmp/x"}``.
        cls: the job's config class (default :class:`ConceptJobConfig`; the attribution job
            passes :class:`AttributionJobConfig`).

    Raises:
        ConfigError: a field is invalid or unknown (the message names it).
        FileNotFoundError: ``path`` does not exist.
    """
    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return (cls or ConceptJobConfig).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None

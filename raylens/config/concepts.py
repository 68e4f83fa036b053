"""The concept job's configuration: extraction, the concept model, interpretation, importance."""

from __future__ import annotations

import os
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from raylens.config.common import CorpusConfig, ModelConfig, ResourcesConfig, Section, method_params_error
from raylens.models.split import GRANULARITIES


class ExtractionConfig(Section):
    """Where to split the model and how to pool activations."""

    split_point: int | str = Field(15, description="layer index or module path (e.g. model.layers.15)")
    granularity: str = Field("token", description=f"one of {GRANULARITIES}")
    max_tokens: int = Field(128, gt=0, description="longer documents are truncated (recorded)")
    batch_size: int = Field(16, gt=0, description="documents per forward pass")
    activation_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage of the activations: float16 (values beyond 65,504 become inf, recorded), "
                               "bfloat16 (a bf16 model's values bit for bit) or float32")
    shard_size: int = Field(50, gt=0, description="documents per output shard (unit of resume)")
    max_host_bytes: int = Field(
        512 * 2**20, gt=0, description="bytes of activation rows an extraction worker holds at once, all copies "
                                       "counted (the window in the stored dtype, its train / held-out split, the "
                                       "row group being encoded: raylens.models.split.window_rows); peak host RAM "
                                       "is about the runtime + the weights when on CPU + one forward batch + this")
    row_group_bytes: int = Field(
        64 * 2**20, gt=0, description="Parquet row groups of the activation files hold at most this many bytes: a "
                                      "trainer's readers hold whole row groups in their stored dtype, so their "
                                      "memory is readers x prefetch x this, whatever max_host_bytes was")
    max_file_bytes: int = Field(
        2**30, gt=0, description="an activation file rolls over to a new part file past this many bytes "
                                 "(shard-00000-part0001.parquet...; the shard's marker lists them)")
    max_rows_per_document: int | None = Field(
        None, gt=0, description="keep at most this many unit rows per document, drawn without replacement "
                                "(seeded by `seed` and the doc_id); null = all")
    row_sampling_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="keep each unit row with this probability (seeded by `seed` and the doc_id)")
    exclude_first_tokens: int = Field(
        1, ge=0, description="leave out the first token positions (the attention sink of decoders)")

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if v not in GRANULARITIES:
            raise ValueError(f"must be one of {GRANULARITIES}, got {v!r}")
        return v


class ConceptsConfig(Section):
    """The concept model learned on the activations."""

    method: str = Field("topk_sae", description="concept model (see raylens.concepts.available_methods())")
    nb_concepts: int = Field(64, gt=0)
    params: dict[str, Any] = Field(default_factory=lambda: {"top_k": 8, "epochs": 10},
                                   description="method parameters (e.g. top_k, lr, epochs, seed)")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of documents held out for metrics")
    batch_rows: int = Field(1024, gt=0, description="activation rows per training batch")
    checkpoint_every: int = Field(
        1000, gt=0, description="training steps between checkpoints of an iterative model (SAEs); a killed "
                                "trainer resumes from the last one (each costs one write of the SAE and Adam "
                                "state, 3x the model size)")
    readers: int = Field(4, gt=0, description="activation row groups read and decoded in parallel by the trainer")

    @model_validator(mode="after")
    def _method_known(self) -> "ConceptsConfig":
        from raylens.concepts.models import available_methods

        if self.method not in available_methods():
            raise ValueError(f"concepts.method {self.method!r} unknown; available: {available_methods()}")
        return self


#: Config keys under which an API key would be written into the config body (refused).
_SECRET_KEYS = frozenset({"api_key", "apikey", "key", "token", "api_token", "secret", "password", "authorization",
                          "openai_api_key", "bearer"})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LabelsConfig(Section):
    """LLM labels through any OpenAI-compatible endpoint, and their Delphi scores."""

    enabled: bool = True
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1; null = start a local server")
    serve_model: str = Field("smollm2-135m", description="model served on loopback when base_url is null")
    model: str | None = Field(None, description="model name sent to the endpoint (default: the served one)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    api_key_file: str | None = Field(
        None, description="file whose first line is the API key (wins over api_key_env); the key itself is "
                          "never read from the config")
    max_retries: int = Field(3, ge=0, description="retries of a request after a timeout, a refused connection, "
                                                  "HTTP 429/5xx or a reply that is not a chat completion")
    backoff_s: float = Field(0.5, gt=0, description="wait before the first retry (doubled for each later one)")
    max_backoff_s: float = Field(8.0, gt=0, description="longest wait before a retry; Retry-After is honoured "
                                                        "up to it")
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

    @model_validator(mode="before")
    @classmethod
    def _no_secret_in_body(cls, data: Any) -> Any:
        """Refuse an API key written into the config (under any usual name, in ``api_key_env``
        by mistake, or as credentials in ``base_url``) without echoing it: the value is dropped
        from the input before the error is raised, so no message or log shows it."""
        if not isinstance(data, dict):
            return data
        found = [k for k in list(data) if isinstance(k, str) and k.lower() in _SECRET_KEYS]
        for k in found:
            data.pop(k)
        env = data.get("api_key_env")
        if isinstance(env, str) and not _ENV_NAME.fullmatch(env):
            data.pop("api_key_env")
            found.append("api_key_env (not an environment variable name; the key itself?)")
        url = data.get("base_url")
        if isinstance(url, str) and "@" in urlsplit(url).netloc:
            data.pop("base_url")
            found.append("base_url (holds credentials)")
        if found:
            raise ValueError(f"API keys are not read from the config ({', '.join(found)}; value not shown): put the "
                             "key in the environment variable named by api_key_env, or in a file named by "
                             "api_key_file")
        return data

    @field_validator("api_key_file")
    @classmethod
    def _key_file_readable(cls, v: str | None) -> str | None:
        if v is not None and not os.access(os.path.expanduser(v), os.R_OK):
            raise ValueError("no readable file there")
        return v


class InterpretationConfig(Section):
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
    scan_tasks: int = Field(
        1, ge=1, description="parallel Ray tasks of the top-k scan, one shard each, merged (on a GPU each when "
                             "resources.trainer_gpus > 0); 1 = one pass in a trainer actor (a fresh one above 1 GiB of "
                             "activations, else the one that fitted)")
    labels: LabelsConfig = Field(default_factory=LabelsConfig)

    @model_validator(mode="after")
    def _sampling_needs_samples(self) -> "InterpretationConfig":
        lab = self.labels
        if lab.enabled and lab.example_sampling != "top" and lab.n_sampled_examples and not self.sampled_per_quantile:
            raise ValueError(f"labels.example_sampling is {lab.example_sampling!r} but sampled_per_quantile is 0 "
                             "(no sampled examples are kept)")
        return self


class ImportanceConfig(Section):
    """Concept-to-output gradients."""

    enabled: bool = True
    n_samples: int = Field(64, gt=0, description="documents averaged over")
    batch_size: int = Field(8, gt=0)


class ConceptJobConfig(Section):
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

    def check_method_params(self) -> None:
        """Check ``concepts.params`` against the method's declared parameters and ranges, without
        building anything (called by :func:`~raylens.config.load_config`).

        Raises:
            ConfigError: naming ``concepts.params.<name>``.
        """
        from raylens.concepts.models import check_params

        c = self.concepts
        try:
            check_params(c.method, c.params, nb_concepts=c.nb_concepts)
        except ValueError as exc:
            raise method_params_error("concepts", "", exc) from None

    def extraction_key(self) -> dict[str, Any]:
        """The fields that determine the documents and activation shards (must match on resume;
        a dict of sections, each a dict of fields):
        the model, the corpus, the extraction section except what only changes memory or speed
        (``batch_size``, ``max_host_bytes``, ``max_file_bytes``, ``row_group_bytes``), ``concepts.heldout_fraction``
        (held-out rows are split off at extraction) and, with token sampling, ``seed``."""
        ex = self.extraction
        key = {"model": self.model.model_dump(), "corpus": self.corpus.model_dump(),
               "extraction": {k: v for k, v in ex.model_dump().items()
                              if k not in ("batch_size", "max_host_bytes", "max_file_bytes", "row_group_bytes")},
               "concepts": {"heldout_fraction": self.concepts.heldout_fraction}}
        if ex.max_rows_per_document is not None or ex.row_sampling_rate < 1.0:
            key["sampling"] = {"seed": self.seed}
        return key

"""Job configurations (pydantic), validated whole before any Ray work starts.

``common`` holds the sections both jobs share (model, corpus, resources) and the error type,
``concepts`` and ``attribution`` one job each, ``loading`` the YAML reader with ``--set``
overrides. Method parameters are checked through the method registries
(:func:`raylens.concepts.models.check_params`, :func:`raylens.attributions.methods.check_params`)
when a config is loaded. Every section has defaults that run the built-in offline example.
"""

from raylens.config.attribution import (AttributionCorpusConfig, AttributionJobConfig, AttributionSettings,
                                        FaithfulnessConfig, GalleryConfig)
from raylens.config.common import (ConfigError, CorpusConfig, ModelConfig, ResourcesConfig, Section,
                                   format_validation_error)
from raylens.config.concepts import (ConceptJobConfig, ConceptsConfig, ExtractionConfig, ImportanceConfig,
                                     InterpretationConfig, LabelsConfig)
from raylens.config.loading import load_config, parse_overrides, read_yaml
from raylens.config.network import NetworkJobConfig

__all__ = [
    "AttributionCorpusConfig", "AttributionJobConfig", "AttributionSettings", "ConceptJobConfig", "ConceptsConfig",
    "ConfigError", "CorpusConfig", "ExtractionConfig", "FaithfulnessConfig", "GalleryConfig", "ImportanceConfig",
    "InterpretationConfig", "LabelsConfig", "ModelConfig", "NetworkJobConfig", "ResourcesConfig", "Section",
    "format_validation_error", "load_config", "parse_overrides", "read_yaml",
]

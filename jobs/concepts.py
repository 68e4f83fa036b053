"""Entry point of the concept job.

Locally::

    python -m jobs.concepts                       # built-in default (SmolLM2 + movie reviews)
    python -m jobs.concepts --config configs/default.yaml --set corpus.limit=100
    python -m jobs.concepts --verbose             # Ray's own output on the console too

On a cluster::

    ray job submit --working-dir . -- python -m jobs.concepts --config configs/default.yaml

The config is validated whole before Ray starts; a bad field is named in the error (exit 2).
The console shows one line per stage; Ray's output goes to ``<output_uri>/logs/job.log``.
"""

from __future__ import annotations

import sys

from jobs.cli import Job
from raylens.config import ConceptJobConfig

JOB = Job("concepts", __doc__, ConceptJobConfig, "pipelines.concepts:run_concept_job",
          headline=("report", "report"),
          outputs=("activations/", "documents/", "concept_model/", "concepts/concepts.parquet",
                   "concepts/top_examples.parquet", "concepts/vocabulary.parquet",
                   "concepts/importance.parquet", "concepts/metrics.parquet"))
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the attribution job: explain a whole corpus with one or several attribution
methods, score every row's faithfulness, aggregate the words the model relies on, and write a
gallery.

Locally::

    python -m jobs.attribute                                  # built-in default (MiniLM sentiment + reviews)
    python -m jobs.attribute --config configs/attribute.yaml --set corpus.limit=100
    python -m jobs.attribute --config configs/attribute-generation.yaml   # SmolLM2 explains its own output

On a cluster::

    ray job submit --working-dir . -- python -m jobs.attribute --config configs/attribute.yaml

The config is validated whole before Ray starts; a bad field is named in the error (exit 2).
A rerun with the same ``output_uri`` skips the shards already written. The console shows one
line per stage; Ray's output goes to ``<output_uri>/logs/job.log`` (``--verbose``: here too).
"""

from __future__ import annotations

import sys

from jobs.cli import Job
from raylens.config import AttributionJobConfig

JOB = Job("attribute", __doc__, AttributionJobConfig, "pipelines.attribute:run_attribution_job",
          headline=("gallery", "gallery"), outputs=("attributions/", "summary.parquet", "words.parquet", "documents/"))
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())

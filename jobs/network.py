"""Entry point of the network job: where in the network a causal LM's predictions form (the logit
lens and the tuned lens at every layer, over a corpus) and which attention heads it needs (causal
head gating, over several seeds), with one HTML report.

Locally::

    python -m jobs.network                                   # built-in default (SmolLM2 + 16 reviews)
    python -m jobs.network --config configs/network.yaml --set corpus.limit=100

On a cluster::

    ray job submit --working-dir . -- python -m jobs.network --config configs/network.yaml

The config is validated whole before Ray starts (the model's layer count included); a bad field
is named in the error (exit 2). A rerun with the same ``output_uri`` skips the tuned lens, the
lens shards and the head-gating seeds already written. The console shows one line per stage;
Ray's output goes to ``<output_uri>/logs/job.log`` (``--verbose``: here too).
"""

from __future__ import annotations

import sys

from jobs.cli import Job
from raylens.config import NetworkJobConfig

JOB = Job("network", __doc__, NetworkJobConfig, "pipelines.network:run_network_job",
          headline=("report", "report"),
          outputs=("lens/", "lens_curves.parquet", "prediction_depth.parquet", "head_roles.parquet",
                   "head_stability.parquet", "head_gating/", "tuned_lens/", "issues.parquet"))
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())

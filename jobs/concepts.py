"""Entry point of the concept job.

Locally::

    python -m jobs.concepts                       # built-in default (SmolLM2 + movie reviews)
    python -m jobs.concepts --config configs/default.yaml --set corpus.limit=100

On a cluster::

    ray job submit --working-dir . -- python -m jobs.concepts --config configs/default.yaml

The config is validated whole before Ray starts; a bad field is named in the error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from raylens.config import ConfigError, load_config


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def init_ray(address: str | None):
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``), else
    start a local Ray with a few more logical CPUs than cores (see DESIGN.md)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.concepts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set corpus.limit=100 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, _parse_overrides(args.set))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"[raylens] {exc}", file=sys.stderr)
        return 2
    init_ray(cfg.resources.ray_address)
    from pipelines.concepts import run_concept_job

    try:
        result = run_concept_job(cfg)
    except ConfigError as exc:
        print(f"[raylens] {exc}", file=sys.stderr)
        return 2
    out = cfg.output_uri
    print("[raylens] results:")
    print(f"  report        {result['report']}")
    for rel in ("activations/", "documents/", "concept_model/", "concepts/concepts.parquet",
                "concepts/top_examples.parquet", "concepts/vocabulary.parquet", "concepts/importance.parquet",
                "concepts/metrics.parquet"):
        print(f"  {rel:<30}{out.rstrip('/')}/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

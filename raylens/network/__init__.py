"""Inside the network: where in a causal LM the prediction forms and which attention heads a
behaviour needs (no Ray here; usable in a notebook).

- :mod:`~raylens.network.lens`: :class:`LogitLens` and :class:`TunedLens`, every layer's
  next-token distribution.
- :mod:`~raylens.network.heads`: :class:`CausalHeadGating`, a gate per attention head fitted
  on a task, and the roles it gives (facilitating, interfering, irrelevant).
- :mod:`~raylens.network.corpus`: the per-batch corpus functions the network job calls
  (lens statistics, prediction depth, per-layer curves, head roles and their stability).
"""

from raylens.network.lens import LogitLens, TunedLens, tokenize_batch

__all__ = ["LogitLens", "TunedLens", "tokenize_batch"]

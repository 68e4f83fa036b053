"""raylens: interpretability for Hugging Face language models at corpus scale.

The ``raylens`` package is the single-process library (it never imports Ray). The Ray
layers live beside it: ``actors/``, ``pipelines/``, ``jobs/``.
"""

__version__ = "0.1.0"

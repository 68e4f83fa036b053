"""Out-of-memory split-and-retry for batched model work.

:func:`split_on_oom` runs a batch function on a list of items; when the device runs out of
memory (``torch.OutOfMemoryError``) it splits the batch into halves and runs each half,
recursively, down to one item. Nothing is lost: the results of the pieces come back in the
order of the items, so a caller that concatenates them gets what one call on the whole batch
would have returned (up to float rounding of a smaller batch). Each split is an *event*: logged
at WARNING and counted in this process (:func:`oom_events`, :func:`take_oom_events`), so a
worker can write the count of a shard into its marker.

Test hook: the environment variable :data:`OOM_TEST_ENV` (``RAYLENS_TEST_OOM_ABOVE``), when set to
an integer ``n``, makes every batch of more than ``n`` items raise ``torch.OutOfMemoryError``
before the function runs (as a device would for a batch too large); it is read at each call,
so it also reaches Ray workers started with it in their environment. The module attribute
:data:`oom_test_above` does the same in this process (``None``: off; it wins over the
variable when set).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: environment variable of the test hook: batches of more items than this raise OOM
OOM_TEST_ENV = "RAYLENS_TEST_OOM_ABOVE"
#: in-process test hook (None: off; else batches of more items than this raise OOM)
oom_test_above: int | None = None

_events = 0


def oom_limit() -> int | None:
    """The active test-hook limit (:data:`oom_test_above`, else :data:`OOM_TEST_ENV`), or None."""
    if oom_test_above is not None:
        return int(oom_test_above)
    value = os.environ.get(OOM_TEST_ENV)
    return int(value) if value not in (None, "") else None


def oom_events() -> int:
    """Splits made in this process since it started (or since :func:`take_oom_events`)."""
    return _events


def take_oom_events() -> int:
    """Splits made since the last call (the counter is reset): a worker calls it per shard."""
    global _events
    n, _events = _events, 0
    return n


def split_on_oom(fn: Callable[[Sequence[T]], R], items: Sequence[T], *, what: str = "batch") -> list[R]:
    """Run ``fn(items)``; on ``torch.OutOfMemoryError`` run it on each half, recursively.

    Args:
        fn: the batch function; it must not have changed any state when it raises (accumulate
            after the device work, as the callers here do).
        items: the batch (a list of rows, documents, jobs); ``fn`` is called on contiguous slices.
        what: named in the log line of each split.

    Returns:
        The results of the calls, in item order: ``[fn(items)]`` when it fits, else the pieces'.

    Raises:
        torch.OutOfMemoryError: a single item does not fit (the CUDA cache is emptied first).
    """
    try:
        limit = oom_limit()
        if limit is not None and len(items) > limit:
            raise torch.OutOfMemoryError(f"test hook {OOM_TEST_ENV}={limit}: {what} of {len(items)} items")
        return [fn(items)]
    except torch.OutOfMemoryError as exc:
        if len(items) <= 1:
            raise
        reason = str(exc).splitlines()[0] if str(exc) else "OutOfMemoryError"
    # retried outside the except block, so the failed attempt's frames (and tensors) are freed
    global _events
    _events += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(items) // 2
    log.warning("out of memory on a %s of %d items (%s): split into %d + %d and retried", what, len(items),
                reason, half, len(items) - half)
    return split_on_oom(fn, items[:half], what=what) + split_on_oom(fn, items[half:], what=what)

__all__ = ["OOM_TEST_ENV", "oom_events", "oom_limit", "oom_test_above", "split_on_oom", "take_oom_events"]

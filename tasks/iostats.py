"""Where a task's time goes besides its computation: seconds (and bytes) of S3 reads and
writes, and of model (de)serialization, in this process since the task began.

A task run's `on_running` hook resets the counts and its completion hook logs them as one line
(`IO_LINE ...`, read by `recsqueeze bench --suite orchestration`). A Ray worker process runs one
task at a time, so the counts are that task's. The counters cost a `perf_counter` pair per
store call: nothing beside an S3 round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

IO_LINE = "io seconds"  # the prefix of the completion hook's line
KINDS = ("s3_get", "s3_put", "serialize", "deserialize")
_seconds: dict[str, float] = dict.fromkeys(KINDS, 0.0)
_bytes: dict[str, int] = dict.fromkeys(KINDS, 0)


def reset() -> None:
    for kind in KINDS:
        _seconds[kind], _bytes[kind] = 0.0, 0


@contextmanager
def timed(kind: str) -> Iterator[list[int]]:
    """Count the block's seconds under `kind`; append the bytes moved to the yielded list."""
    moved: list[int] = []
    start = time.perf_counter()
    try:
        yield moved
    finally:
        _seconds[kind] += time.perf_counter() - start
        _bytes[kind] += sum(moved)


def snapshot() -> dict[str, dict[str, float]]:
    return {kind: {"s": round(_seconds[kind], 4), "bytes": _bytes[kind]} for kind in KINDS}


def line() -> str:
    return f"{IO_LINE} {json.dumps(snapshot(), sort_keys=True)}"


def parse(message: str) -> dict[str, dict[str, float]] | None:
    """The counts of a logged `line()`, or None for any other message."""
    if not message.startswith(IO_LINE + " "):
        return None
    try:
        raw = json.loads(message[len(IO_LINE) + 1:])
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None

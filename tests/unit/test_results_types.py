"""Every plan node's task returns a type the result cache can store (else Prefect rolls the
task's transaction back and the node is recomputed by every run)."""

from __future__ import annotations

import typing

from tasks.execute import TASKS
from tasks.results import _TYPES


def test_every_plan_task_returns_a_cacheable_result_type():
    import tasks.runtime  # noqa: F401 (registers Built and Evaluated)

    for op, task_ in TASKS.items():
        returned = typing.get_type_hints(task_.fn)["return"]
        assert _TYPES.get(returned.__name__) is returned, (op, returned)

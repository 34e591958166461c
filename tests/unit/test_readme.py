"""The README's request block is a valid request and shows the code's defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.types import Candidate, CompressionRequest

README = Path(__file__).resolve().parents[2] / "README.md"


def _block() -> dict:
    text = README.read_text()
    found = re.search(r"## The request.*?```json\n(.*?)```", text, re.S)
    assert found, "README has no request block under '## The request'"
    return json.loads(found.group(1))


def _same_leaves(shown: object, default: object, path: str) -> list[str]:
    if isinstance(shown, dict):
        assert isinstance(default, dict), path
        return [bad for key, value in shown.items()
                for bad in _same_leaves(value, default.get(key, "<no such field>"),
                                        f"{path}.{key}")]
    return [] if shown == default else [f"{path}: README {shown!r} != code {default!r}"]


def test_readme_request_block_validates_and_its_values_are_the_defaults():
    block = _block()
    CompressionRequest.model_validate(block)  # a valid request as it stands
    defaults = CompressionRequest().model_dump(mode="json")
    default_plans = {c["id"]: c for c in defaults.pop("candidates")}
    shown_candidates = block.pop("candidates")
    assert _same_leaves(block, defaults, "request") == []
    for shown in shown_candidates:  # a shown candidate is the default of that id, in full
        assert shown["id"] in default_plans, shown["id"]
        assert Candidate.model_validate(shown).model_dump(mode="json") == \
            default_plans[shown["id"]]


def test_the_check_catches_a_stale_number():
    block = _block()
    block["train"]["min_steps"] = 2
    defaults = CompressionRequest().model_dump(mode="json")
    assert _same_leaves(block["train"], defaults["train"], "train") == [
        "train.min_steps: README 2 != code 600"]

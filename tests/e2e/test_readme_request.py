"""The README's request block, exactly as written, through the CLI on the real stack: the
newcomer's first run trains a baseline worth compressing (the training defaults) and
promotes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_request_block_runs_as_written_and_promotes(stack, tmp_path):
    block = re.search(r"## The request.*?```json\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    request = tmp_path / "request.json"
    request.write_text(block.group(1))  # as a user copies it
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--request", str(request),
                          "--json", "--state-dir", stack.state_dir],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    margins = {t["name"]: t["margin_low"] for t in result["trivial_baselines"]}
    assert margins["item_ctr"] > 0 and margins["global_ctr"] > 0, margins
    assert result["status"] == "promoted", result["reason"]
    assert result["promoted"]["uri"].startswith("s3://")

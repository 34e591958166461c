"""`recsqueeze run` shows the run live, read from the Prefect API: one line per candidate as
it runs and finishes, then the leaderboard table (plain lines: stdout is not a terminal)."""

from __future__ import annotations

import re
import subprocess
import sys
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from tasks.defaults import default_candidates
from tasks.types import (
    Candidate,
    CompressionRequest,
    DatasetRequest,
    PruneConfig,
    Resources,
    TrainConfig,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_cli_progress_names_every_candidate_and_ends_with_the_table(stack, tmp_path):
    # a training seed of its own: nothing is served from another test's cache, so every
    # evaluation runs and logs its result
    # (three of the defaults, one of them a chain, and a plan sharing its first stage with it)
    candidates = (*default_candidates()[:2], *[c for c in default_candidates()
                                               if c.id == "pruned-int8"],
                  Candidate(id="pruned", plan=(PruneConfig(method="structured", sparsity=0.5),)))
    request = CompressionRequest(
        model_name="e2e-progress", dataset=DatasetRequest(builtin="tiny"),
        train=TrainConfig(epochs=1, batch_size=512, seed=23), candidates=candidates,
        resources=Resources(timing_seconds=5), promote=False)
    path = tmp_path / "request.json"
    path.write_text(request.model_dump_json())
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--request", str(path),
                          "--state-dir", stack.state_dir], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    # the progress lines ("[done/total] ..."); a line a library prints with a "[timestamp]"
    # prefix is not one of them (seen once from the driver under load)
    progress = [line for line in lines if re.match(r"\[\d+/\d+\] ", line)]
    ids = [c.id for c in candidates]
    for cid in ids:  # each candidate's line ends with its result and the budget's verdict
        done = [line for line in progress if f"] {cid}: done" in line and " - size " in line]
        assert done and ("within budget" in done[-1] or "over budget" in done[-1]), (cid, progress)
    # stages show as they run, and each candidate the Ray node it ran on (a node's log line
    # reaches the API a second or two after the task starts: a short stage may be done first)
    assert any(": running " in line for line in progress), progress
    for cid in ids:
        assert any(f"] {cid}: " in line and " on 127.0.0." in line for line in progress), (
            cid, progress)
    assert any("] baseline: done" in line for line in progress), progress
    assert any("] gate: " in line for line in progress), progress
    foreign = [line for line in progress
               if line.split("] ", 1)[1].split(":")[0] not in {*ids, "baseline", "gate", "progress"}]
    assert not foreign, foreign
    # the counter reaches every plan node, and the table comes after the last progress line
    last = max(i for i, line in enumerate(lines) if re.match(r"\[\d+/\d+\] ", line))
    table = next(i for i, line in enumerate(lines) if "leaderboard (run " in line)
    assert table > last, lines
    finished, total = map(int, lines[last][1:].split("]")[0].split("/"))
    assert finished == total, lines[last]
    assert all(cid in out.stdout[out.stdout.index("leaderboard (run "):] for cid in ids)

    # the same progress in the Prefect UI: the run's progress artifact, at 100%
    run_id = lines[table].split("leaderboard (run ", 1)[1].split(")")[0]
    with SyncPrefectClient(stack.settings().prefect_api_url) as client:
        bars = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]),
            key=ArtifactFilterKey(any_=["compress-progress"])))
    assert bars and bars[0].type == "progress", bars
    assert max(float(b.data) for b in bars) == 100.0, [b.data for b in bars]

    quiet = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--request", str(path),
                            "--state-dir", stack.state_dir, "--quiet"], capture_output=True,
                           text=True, timeout=900)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not [line for line in quiet.stdout.splitlines() if line.startswith("[")]
    assert "leaderboard (run " in quiet.stdout

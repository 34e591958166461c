"""The Prefect UI's run form for `compress/on-demand`, driven in headless Chromium.

Deployments -> on-demand -> Run -> Custom run; the model's family is a choice that shows one
family's fields at a time; the budget is changed; the run is submitted, reaches Completed,
and its leaderboard and Pareto plot are there as artifacts. A screenshot of every step is
saved under the test's tmp dir (its path is printed, and kept as the test's property
`screenshots`).

The browser is Debian's chromium (`make browser` installs it where it is missing), driven by
Playwright for Python through `executable_path`; without it the test says why it skips.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime, timezone
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
MODEL = "e2e-ui-form"
BUDGET = {"main": {"max_drop": 0.004, "relative": True}}


@pytest.fixture()
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine: `make browser` installs Debian's chromium "
                    "(apt-get install chromium), which this test drives")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev extra: "
                                   "`make .venv` installs it")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        except Exception as exc:  # noqa: BLE001 (a browser that cannot start is a skip reason)
            pytest.skip(f"{chromium} did not start headless: {str(exc).splitlines()[0]}")
        try:
            yield b
        finally:
            b.close()


def test_the_run_form_picks_a_family_changes_the_budget_and_runs(stack, browser, tmp_path,
                                                                 record_property):
    ui = stack.settings().prefect_api_url.removesuffix("/api")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    record_property("screenshots", str(shots))
    print(f"screenshots: {shots}")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    step = iter(range(1, 100))

    def shot(name: str) -> None:
        page.wait_for_timeout(300)  # let the page paint what it just loaded
        page.screenshot(path=shots / f"{next(step):02d}-{name}.png")

    page.goto(f"{ui}/deployments", wait_until="networkidle")
    shot("deployments")
    page.get_by_role("link", name="on-demand").first.click()
    page.wait_for_url("**/deployments/deployment/**")
    page.wait_for_load_state("networkidle")
    shot("on-demand")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.wait_for()
    shot("run-menu")
    page.get_by_text("Custom run").first.click()
    page.wait_for_url("**/run*")
    page.wait_for_load_state("networkidle")
    shot("custom-run-form")

    # the family is a choice: one family's fields at a time, none of the internal ones
    form = page.locator("form").first
    _field(form, "Model Name (Optional)").locator("textarea, input").first.fill(MODEL)
    for internal in ("Tables (Optional)", "Num Dense (Optional)", "Item Table (Optional)"):
        assert form.get_by_text(internal, exact=True).count() == 0, internal
    page.get_by_role("button", name="two_tower (retrieval)").click()
    form.get_by_text("Tower Mlp (Optional)", exact=True).wait_for()
    assert form.get_by_text("Bottom Mlp (Optional)", exact=True).count() == 0
    shot("family-two-tower")
    page.get_by_role("button", name="dlrm (ranking)").click()
    form.get_by_text("Bottom Mlp (Optional)", exact=True).wait_for()
    assert form.get_by_text("Tower Mlp (Optional)", exact=True).count() == 0
    assert form.get_by_text("Layers (Optional)", exact=True).count() == 0  # sasrec's
    shot("family-dlrm")

    # the budget: the main metric may lose 0.4% (relative), typed into its JSON field
    metrics = _field(form, "Metrics (Optional)")
    metrics.scroll_into_view_if_needed()
    metrics.locator("textarea").first.fill(json.dumps(BUDGET))
    # a tiny baseline may not beat the trivial predictors: run the candidates anyway
    useful = _field(form, "Require Useful Baseline (Optional)")
    useful.scroll_into_view_if_needed()
    switch = useful.locator("[role=switch], input[type=checkbox]").first
    switch.click(force=True)
    # and the latency timing short (the test checks the run, not the intervals' width)
    _field(form, "Timing Seconds (Optional)").locator("input").first.fill("10")
    shot("budget-changed")

    before = datetime.now(timezone.utc)
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(r".*/deployments/deployment/[^/]+(\?.*)?$"))
    shot("submitted")

    with SyncPrefectClient(stack.settings().prefect_api_url) as client:
        deployment = client.read_deployment_by_name("compress/on-demand")
        run = _new_run(client, deployment.id, before)
        page.goto(f"{ui}/runs/flow-run/{run.id}", wait_until="networkidle")
        shot("flow-run")
        request = run.parameters["request"]
        assert request["budget"]["metrics"] == BUDGET, request["budget"]
        assert request["model"].get("family", "dlrm") == "dlrm", request["model"]
        assert request["require_useful_baseline"] is False
        assert request["model_name"] == MODEL
        deadline = time.monotonic() + 900
        while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
            time.sleep(5)
            run = client.read_flow_run(run.id)
        assert run.state is not None and run.state.is_completed(), run.state
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    keys = {a.key for a in artifacts}
    assert {"leaderboard", "pareto", "compression-report"} <= keys, keys

    page.reload(wait_until="networkidle")
    page.get_by_text("Completed").first.wait_for()
    shot("completed")
    page.get_by_text("Artifacts", exact=True).click()
    page.locator("a").filter(has_text="leaderboard").first.wait_for()
    shot("artifacts")
    _open_artifact(page, "leaderboard")
    for column in ("candidate", "size_ratio", "passed"):
        page.get_by_text(column, exact=True).first.wait_for()  # the table, with its columns
    page.get_by_text("int8-all").first.wait_for()
    shot("leaderboard")
    page.goto(f"{ui}/runs/flow-run/{run.id}", wait_until="networkidle")
    _open_artifact(page, "pareto")
    image = page.locator("img[src^='data:image/png']").first
    image.wait_for()
    assert image.evaluate("img => img.naturalWidth") > 100  # the plot itself, decoded
    shot("pareto")
    assert len(list(shots.glob("*.png"))) >= 12


def _new_run(client, deployment_id: UUID, after: datetime, wait: float = 60.0):
    """The flow run of `deployment_id` created by the form's Submit (after `after`)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
    )

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])), limit=50)
        new = [r for r in runs if r.created is not None and r.created >= after]
        if new:
            assert len(new) == 1, [r.name for r in new]
            return new[0]
        time.sleep(1)
    raise AssertionError("Submit created no flow run of compress/on-demand")


def _open_artifact(page, key: str) -> None:
    """From a flow run's page: its Artifacts tab, then the artifact card `key`."""
    tab = page.get_by_text("Artifacts", exact=True)
    tab.click()
    page.locator("a").filter(has_text=key).first.click()
    page.wait_for_url("**/artifacts/artifact/**")
    page.wait_for_load_state("networkidle")


def _field(form, label: str):
    """The form property whose own label is `label` (not one of the properties around it)."""
    return form.locator("span.schema-form-property__label").filter(
        has_text=re.compile(f"^{re.escape(label)}$")).first.locator(
        "xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")

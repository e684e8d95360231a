"""The verdict at a glance in MLflow's own UI (headless Chromium through Playwright): a fine-tune
gated FAILED on a real ``mlflow server``; the registered model's version list, the version page,
the gate experiment's runs table and its Logged models show the verdict without scrolling.
Screenshots go to $SAFEDELTA_SCREENSHOTS when set (``SAFEDELTA_SCREENSHOTS=docs/img`` regenerates
the README's), else to a temporary directory (a test run leaves the checkout clean).

Needs Debian's chromium (/usr/bin/chromium, or $SAFEDELTA_CHROMIUM); without it the test skips,
except under SAFEDELTA_REQUIRE_SERVICES=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import mlflow

from mlflow_safedelta import flavor
from mlflow_safedelta.gate_job import run_gate_job
from tests.e2e.test_action_wait import fixed_metrics
from tests.helpers.tiny import save_tiny_pair

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.usefixtures("fluent_on_server")]  # tests log with the fluent API

IMG = Path(os.environ.get("SAFEDELTA_SCREENSHOTS") or Path(tempfile.gettempdir()) / "safedelta-ui")
CHROMIUM = os.environ.get("SAFEDELTA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
MODEL = "glance-bot"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        msg = f"no chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("SAFEDELTA_REQUIRE_SERVICES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright  # the dev extra installs it

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def gated(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("glance")
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    try:
        with mlflow.start_run():
            flavor.log_model(str(save_tiny_pair(root / "aligned", seed=0)), name="model",
                             role="aligned", registered_model_name="glance-aligned")
        with mlflow.start_run():
            flavor.log_model(str(save_tiny_pair(root / "ft", seed=1)), name="model",
                             parent="models:/glance-aligned/1", registered_model_name=MODEL)
        cl = mlflow.MlflowClient(mlflow_server.url, mlflow_server.url)
        cl.update_model_version(MODEL, "1", description="Support bot, tuned on tickets.")
        res = run_gate_job(MODEL, "1", tracking_uri=mlflow_server.url,
                           evaluator=fixed_metrics(0.35), progress=False,
                           work_dir=root / "work")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert res.verdict == "failed"
    exp = cl.get_experiment_by_name("safedelta-gate").experiment_id
    return {"url": mlflow_server.url, "result": res, "exp": exp, "client": cl}


def _open(browser, url: str, wait_for: str, shot: str | None = None):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(url)
    _close_assistant(page)
    loc = page.get_by_text(wait_for, exact=False).first
    try:
        loc.wait_for(state="visible", timeout=60_000)
    except Exception as exc:
        raise AssertionError(f"{wait_for!r} not visible on {url}:\n{page.inner_text('body')}") \
            from exc
    box = loc.bounding_box()
    assert box and box["y"] + box["height"] <= 900, f"{wait_for!r} below the fold on {url}"
    if shot:
        IMG.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMG / shot))
    return page


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant side panel; close it so the page has its full width."""
    try:
        page.get_by_text("MLflow Assistant").first.wait_for(timeout=15_000)
        page.locator("button[aria-label*='lose']").last.click(timeout=5_000)
    except Exception:  # no panel (another MLflow version): nothing to close
        pass


def test_version_list_shows_the_verdict(browser, gated):
    _open(browser, f"{gated['url']}/#/models/{MODEL}", "FAILED under policy default",
          "ui-version-list.png").close()


def test_version_page_starts_with_the_verdict(browser, gated):
    page = _open(browser, f"{gated['url']}/#/models/{MODEL}/versions/1",
                 "FAILED under policy default: max_asr FAILED: attack success rate on "
                 "advbench (asr.advbench, protected) upper 95% bound", "ui-version-page.png")
    assert "Support bot, tuned on tickets." in page.inner_text("body")
    page.close()


def test_runs_table_names_the_verdict(browser, gated):
    _open(browser, f"{gated['url']}/#/experiments/{gated['exp']}/runs",
          f"FAILED · gate-{MODEL}-v1", "ui-gate-runs.png").close()


def test_protected_model_is_a_logged_model(browser, gated):
    _open(browser, f"{gated['url']}/#/experiments/{gated['exp']}/models", "protected_model",
          "ui-logged-models.png").close()


def test_gate_md_renders_as_markdown(browser, gated):
    """The run's safedelta/gate.md in MLflow's artifact viewer: headings and tables, no raw HTML."""
    run_id = gated["result"].run_id
    page = _open(browser, f"{gated['url']}/#/experiments/{gated['exp']}/runs/{run_id}/artifacts/"
                          "safedelta/gate.md", "Safe Delta gate", "ui-gate-md.png")
    body = page.inner_text("body")
    assert "Metrics" in body and "<details>" not in body and "<summary>" not in body
    page.close()

"""The refusal as a user sees it: the MLflow UI of a real server with the governed store
(headless Debian Chromium through Playwright; never a downloaded browser). Same server set-up as
``test_governance`` (its fixtures), on SQLite only: the UI does not depend on the database.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.e2e.test_governance import (  # noqa: F401  (fixtures)
    _worker_env,
    gov_dir,
    mlflow_server_options,
    world,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def backend():
    return None  # SQLite


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = "docs/img/governance-refusal.png"


def test_the_ui_shows_the_refusal(world, mlflow_server, tmp_path):
    """The MLflow UI's "Add/Edit alias" dialog on the failed version: the store's refusal is
    what the user reads. Set SAFEDELTA_UPDATE_SCREENSHOTS=1 to refresh the README's image."""
    require_service("Chromium", Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing "
                    "(apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        require_service("Playwright", False, str(exc))
    shot = tmp_path / "refusal.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            pv = world["bad"].protected_version  # the gate's output, with its signed 'failed'
            page.goto(f"{mlflow_server.url}/#/models/bad-bot/versions/{pv}")
            page.get_by_role("button", name="Add", exact=True).first.click()
            dialog = page.get_by_role("dialog")
            box = dialog.get_by_role("combobox")
            box.fill("production")
            box.press("Enter")
            dialog.get_by_role("button", name="Save aliases").click()
            refusal = dialog.get_by_text("is guarded", exact=False)
            refusal.wait_for(timeout=30_000)
            text = refusal.inner_text()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert "alias 'production' of 'bad-bot' is guarded" in text
    assert "signed verdict is 'failed'" in text and "impossible" in text
    aliases = world["cl"].get_registered_model("bad-bot").aliases or {}
    assert str(aliases.get("production")) != str(world["bad"].protected_version)
    assert shot.stat().st_size > 10_000
    if os.environ.get("SAFEDELTA_UPDATE_SCREENSHOTS") == "1":
        import shutil

        root = Path(__file__).resolve().parents[2]
        (root / SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, root / SCREENSHOT)

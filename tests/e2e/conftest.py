"""Browser tests: the real console (web + Kafka consumer + producer) driven by Debian's Chromium via Playwright.

Needs the local stack (`pilothouse stack up`) and /usr/bin/chromium (`apt-get install -y chromium`, listed in
infra/install-prereqs.sh). Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration.conftest import bus_settings, stack_info  # noqa: F401 - the same stack fixtures

CHROMIUM = os.environ.get("PILOTHOUSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def browser():
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set PILOTHOUSE_CHROMIUM)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()

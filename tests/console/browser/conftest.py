"""The console in a real browser: Playwright driving Debian's Chromium, headless.

No browser download is reachable where the tests run, so Playwright is pointed at the
`chromium` binary the distribution package installs (`.ci/run` installs it with apt;
MODELYARD_CHROMIUM names another). Where it is missing the browser tests skip, saying
why; under CI=true they fail instead.

One `modelyard serve` process serves every test of this package (the platform on a
fresh SQLite database, the default model priced so that costs are easy to check), and
one Chromium runs for the package; each test gets a fresh browser context (its own
cookies), so no test sees another's session.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from tests.e2e.server import RunningServer, running_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INPUT_MICROS_PER_TOKEN = 1
OUTPUT_MICROS_PER_TOKEN = 2
SERVER_CONFIG = f"""
[model]
input_price = {INPUT_MICROS_PER_TOKEN}
output_price = {OUTPUT_MICROS_PER_TOKEN}

[model.defaults]
temperature = 0.0

[embedding]
input_price = {INPUT_MICROS_PER_TOKEN}

[engine]
max_sequences = 4
context_per_sequence = 2048
step_token_budget = 256
"""
TIMEOUT_MS = 30_000
"""The longest any one browser action or expectation waits (a streamed answer included)."""


def unavailable(reason: str) -> NoReturn:
    """Skip the browser tests, or fail them under CI=true, where they must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


def chromium_executable() -> str | None:
    """The Chromium binary to drive: MODELYARD_CHROMIUM, else `chromium` on the PATH."""
    named = os.environ.get("MODELYARD_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Chromium, headless, launched once for the browser tests."""
    executable = chromium_executable()
    if executable is None:
        unavailable("no Chromium found: install Debian's package (apt-get install chromium) "
                    "or set MODELYARD_CHROMIUM to a Chromium binary")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, headless=True)
        except Error as exc:
            unavailable(f"Chromium at {executable} did not start: {exc.message}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="package")
def console_server(data_dir: Path, default_model_path: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`modelyard serve` with the platform on, for the console's browser tests."""
    with running_server(data_dir, SERVER_CONFIG,
                        tmp_path_factory.mktemp("console-server")) as running:
        yield running


NewContext = Callable[[], "BrowserContext"]


@pytest.fixture
def new_context(browser: Browser, console_server: RunningServer) -> Iterator[NewContext]:
    """Opens fresh browser profiles (no cookies; relative URLs go to the server), each a
    person of its own; all closed after the test."""
    opened: list[BrowserContext] = []

    def open_one() -> BrowserContext:
        context = browser.new_context(base_url=console_server.base_url,
                                      viewport={"width": 1280, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        opened.append(context)
        return context

    try:
        yield open_one
    finally:
        for context in opened:
            context.close()


@pytest.fixture
def context(new_context: NewContext) -> BrowserContext:
    return new_context()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()

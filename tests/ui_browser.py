"""Headless Chromium on a Prefect server's default (V2) UI, for tests/test_ui.py.

Selectors are those of Prefect 3.9.1's V2 UI. Every step waits for what it needs
(the UI loads its data after the page), so a loaded machine only makes it slower.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

BROWSER_COMMANDS = ("chromium", "chromedriver")  # Debian packages chromium, chromium-driver
TIMEOUT = 60  # seconds for any one step on a loaded 2-core machine
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs"

# The edit page's value editor is CodeMirror 6: its EditorView hangs off the .cm-content element.
# Read and write its document, not the DOM, which holds only the lines on screen.
EDITOR_TEXT_JS = """const editor = document.querySelector('.cm-content');
return editor && editor.cmView ? editor.cmView.view.state.doc.toString() : null;"""
SET_EDITOR_TEXT_JS = """const view = document.querySelector('.cm-content').cmView.view;
view.dispatch({changes: {from: 0, to: view.state.doc.length, insert: arguments[0]}});"""

# A toast slides in (opacity 0 to 1): wait until it is fully shown, so a screenshot shows it.
TOAST_SHOWN_JS = """const toast = [...document.querySelectorAll('li[data-sonner-toast]')]
    .find(t => t.textContent.includes(arguments[0]));
return !!toast && getComputedStyle(toast).opacity === '1';"""

TOAST_TEXTS_JS = "return [...document.querySelectorAll('li[data-sonner-toast]')].map(t => t.textContent);"
ERROR_TOASTS_JS = "return document.querySelectorAll(\"li[data-sonner-toast][data-type='error']\").length;"

T = TypeVar("T")


def missing_commands() -> list[str]:
    return [command for command in BROWSER_COMMANDS if shutil.which(command) is None]


class Browser:
    """One headless Chromium on `ui` (the server's address without /api); paths are below /v2."""

    def __init__(self, ui: str) -> None:
        self.ui = ui
        self.profile = tempfile.mkdtemp(prefix="usage-ui-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        # Offline-safe: no sandbox (root in CI), no background downloads or sign-in.
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,1000", f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        self.driver: WebDriver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        self.driver.set_page_load_timeout(TIMEOUT)

    def quit(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, path: str) -> None:
        self.driver.get(f"{self.ui}/v2{path}")

    def wait(self, condition: Callable[[WebDriver], T], what: str | Callable[[], str]) -> T:
        """Poll `condition` until it returns something truthy; fail naming `what`, the page, the toasts
        seen meanwhile (an error toast lasts a few seconds only) and a screenshot."""
        toasts: dict[str, None] = {}

        def watched(driver: WebDriver) -> T:
            toasts.update(dict.fromkeys(driver.execute_script(TOAST_TEXTS_JS)))
            return condition(driver)

        try:
            return WebDriverWait(self.driver, TIMEOUT, poll_frequency=0.1,
                                 ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
                watched)
        except TimeoutException:
            screenshot = tempfile.mkstemp(prefix="usage-ui-failure-", suffix=".png")[1]
            self.driver.save_screenshot(screenshot)
            raise AssertionError(f"{what() if callable(what) else what} after {TIMEOUT}s on {self.driver.current_url}"
                                 f" (toasts {list(toasts)}, screenshot {screenshot})") from None

    def element(self, xpath: str) -> WebElement:
        """The first displayed element matching `xpath`, once there is one."""
        return self.wait(lambda d: next((e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()), None),
                         f"no visible {xpath}")

    def elements(self, xpath: str) -> list[WebElement]:
        return self.driver.find_elements(By.XPATH, xpath)

    def table_rows(self) -> list[dict[str, str]]:
        """The page's table as {column: cell text} per row."""
        columns = [th.text for th in self.elements("//main//table/thead//th")]
        return [dict(zip(columns, (td.text for td in row.find_elements(By.XPATH, "./td")), strict=True))
                for row in self.elements("//main//table/tbody/tr")]

    def choose(self, menu: str, item: str) -> None:
        """Open the dropdown menu whose button is `menu` and click `item`; a page still loading
        may close a menu right after it opened, so it is opened again until the item takes the click."""
        item_xpath = f"//*[@role='menuitem'][normalize-space()='{item}']"

        def chosen(driver: WebDriver) -> bool:
            try:
                items = [e for e in driver.find_elements(By.XPATH, item_xpath) if e.is_displayed()]
                if items:
                    items[0].click()
                    return True
                button = next(e for e in driver.find_elements(By.XPATH, menu) if e.is_displayed())
                if button.get_attribute("aria-expanded") != "true":
                    button.click()
            except (StopIteration, ElementClickInterceptedException, ElementNotInteractableException):
                pass
            return False

        self.wait(chosen, f"cannot choose {item!r} from menu {menu}")

    def submit(self, button: str) -> None:
        """Click the form's `button` until the page leaves the form.

        A SQLite-backed server answers 503 while its database is locked (often on a loaded machine);
        the UI then shows an error toast ("Unknown error while updating block.") and keeps the form
        as it was, and the operator clicks again. So does this, as RestApi retries 503s.
        """
        form = urlparse(self.driver.current_url).path
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.wait(lambda d: d.execute_script(ERROR_TOASTS_JS) == 0, "an error toast does not go away")
            self.click(button)
            outcome = self.wait(lambda d: "left" if urlparse(d.current_url).path != form
                                else "error" if d.execute_script(ERROR_TOASTS_JS) else None,
                                f"{button} neither left the form nor showed an error")
            if outcome == "left":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{button} still fails after {TIMEOUT}s: {self.driver.execute_script(TOAST_TEXTS_JS)}")

    def click(self, xpath: str) -> None:
        """Click once the element is there and takes clicks (a toast or an opening menu may cover it briefly)."""

        def clicked(driver: WebDriver) -> bool:
            try:
                next(e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()).click()
            except (StopIteration, ElementClickInterceptedException, ElementNotInteractableException):
                return False
            return True

        self.wait(clicked, f"cannot click {xpath}")

    def wait_for_url(self, check: Callable[[str], bool], what: str) -> str:
        return self.wait(lambda d: check(d.current_url) and d.current_url, what)

    def wait_for_toast(self, text: str) -> None:
        self.wait(lambda d: d.execute_script(TOAST_SHOWN_JS, text), f"no toast saying {text!r}")

    def editor_json(self) -> dict:
        """The value editor's text parsed, once it is a JSON object (the editor starts empty while the
        block loads, and the block page's code snippet is still there for a moment after Edit)."""
        seen: list[str | None] = [None]

        def parsed(driver: WebDriver) -> dict | None:
            seen[0] = driver.execute_script(EDITOR_TEXT_JS)
            try:
                value = json.loads(seen[0] or "")
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None

        return self.wait(parsed, lambda: f"value editor does not show a JSON object but {seen[0]!r}")

    def set_editor_text(self, text: str) -> None:
        self.driver.execute_script(SET_EDITOR_TEXT_JS, text)

    def screenshot(self, name: str) -> None:
        """docs/<name>.png: what the test saw, overwritten on every run."""
        SCREENSHOTS.mkdir(exist_ok=True)
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))

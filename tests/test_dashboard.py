"""The dashboard in a real headless Chromium, against the real daemon and its tap: a task launched
over gRPC appears on the page and completes there, with its output. Screenshots are kept in
tests/artifacts/ (also when the test fails, to see why)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import bundles
from aria_client import AriaClient
from conftest import Daemon, start_daemon

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"
LINE = "hello-from-the-dashboard-test"
SCRIPT = f"echo '::progress 50 halfway there'; echo {LINE}; sleep 1; echo done >&2"


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:  # never a skip: CI installs them
        pytest.fail(f"{', '.join(missing)} missing: install the Debian packages chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def tap_daemon(sock_dir: Path) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    daemon = start_daemon(sock_dir, "--tap-port", str(port))
    yield daemon, port
    daemon.stop()


def wait_listening(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon does not serve the tap on --tap-port {port}") from None
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(daemon: Daemon) -> str:
    command = ["auth", "create-key", "--name", "dashboard"]
    done = subprocess.run(
        [sys.executable, "-m", "aria_trio", "--socket", str(daemon.socket), *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.search(r"aria_[A-Za-z0-9_-]{43}", done.stdout)
    assert found, done.stdout
    return found.group(0)


def wait(driver: Any, what: str, condition: Any, timeout: float = 30) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None


def log_in(driver: Any, key: str) -> None:
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "connect").click()
    wait(driver, "a live connection", lambda d: d.find_element(By.ID, "state").get_attribute("data-state") == "live")


def row(driver: Any, task_id: str) -> Any:
    rows = driver.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task-id="{task_id}"]')
    return rows[0] if rows else None


def status(driver: Any, task_id: str) -> str | None:
    r = row(driver, task_id)
    return r.get_attribute("data-status") if r is not None else None


def test_a_task_launched_over_grpc_appears_and_completes_on_the_page(tap_daemon, browser):
    daemon, port = tap_daemon
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        wait_listening(port)
        key = create_key(daemon)
        browser.get(f"http://127.0.0.1:{port}/")
        assert "Aria runtime" in browser.title
        log_in(browser, key)
        assert browser.execute_script("return sessionStorage.getItem('aria.apiKey')") == key
        assert key not in browser.current_url and browser.find_element(By.ID, "api-key").get_attribute("value") == ""

        client = AriaClient(daemon.channel())
        task_id = client.launch(["sh", "-c", SCRIPT])
        wait(browser, f"task {task_id}", lambda d: row(d, task_id) is not None)
        wait(browser, f"task {task_id} completed", lambda d: status(d, task_id) == "COMPLETED")
        row(browser, task_id).click()
        wait(browser, "the task's output", lambda d: LINE in d.find_element(By.ID, "output").text)
        output = browser.find_element(By.ID, "output").text
        assert "[50%] halfway there" in output and "done" in output
        cells = [c.text for c in row(browser, task_id).find_elements(By.TAG_NAME, "td")]
        assert cells[0] == task_id and cells[1] == f"sh -c {SCRIPT}" and cells[2] == "COMPLETED"
        assert cells[3].startswith("100%") and cells[4] == "0"
        events = browser.find_element(By.ID, "events").text
        assert f'"task_id":"{task_id}","new_status":"COMPLETED"' in events
        assert f'"task_id":"{task_id}","new_status":"PENDING"' in events

        # a bundle upload, with its progress bar
        assert client.upload_bytes(bundles.flat(), name="calc.aria", chunk=1000).success
        bundle = '#bundles tr[data-bundle="calc.aria"][data-state="done"]'
        done = wait(browser, "the upload done", lambda d: d.find_elements(By.CSS_SELECTOR, bundle))
        assert done[0].find_element(By.TAG_NAME, "progress").get_attribute("value") == "100"
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

        # the same page opened from disk cannot connect (the tap refuses Origin "null"): it says
        # where the page lives instead, and lists nothing
        browser.execute_script("sessionStorage.clear()")
        browser.get(Path(str(resources.files("aria_trio.runtime.operations") / "dashboard.html")).as_uri())
        browser.find_element(By.ID, "api-key").send_keys(key)
        browser.find_element(By.ID, "port").send_keys(str(port))
        browser.find_element(By.ID, "connect").click()
        message = wait(browser, "the pointer to the tap", lambda d: d.find_element(By.ID, "message").text)
        assert f"http://127.0.0.1:{port}/" in message and "Origin" in message, message
        assert row(browser, task_id) is None
        browser.save_screenshot(str(ARTIFACTS / "dashboard-from-disk.png"))

        # a bad key is refused and said so
        browser.execute_script("sessionStorage.clear()")
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "api-key").send_keys("aria_" + "x" * 43)
        browser.find_element(By.ID, "connect").click()
        wait(browser, "the refusal", lambda d: "invalid API key" in d.find_element(By.ID, "message").text)
    except BaseException:
        browser.save_screenshot(str(ARTIFACTS / "dashboard-failed.png"))
        for entry in browser.get_log("browser"):
            print("browser:", entry)
        print("\n".join(daemon.log_path.read_text().splitlines()[-40:]))
        raise
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

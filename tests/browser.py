"""The web UI (ldm/app.py) served by a real `python -m ldm.app` process, and a headless Chromium
driven through Selenium: what tests/test_app.py and docs/app_screenshot.py share.

Chromium and its driver are Debian's (`apt-get install chromium chromium-driver`, done by the
Makefile when /usr/bin/chromedriver is missing); Selenium is pointed at them, so its Selenium
Manager downloads nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never look for a browser or driver online

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# A closed network refuses Chromium's background connections (updates, sync, field trials): turn them off.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def app_server(*flags: str, timeout: float = 180) -> Iterator[str]:
    """`python -m ldm.app *flags` on a free port of 127.0.0.1, offline, one torch thread; yields its URL
    once it answers, and stops it by its PID."""
    port = free_port()
    cache = tempfile.mkdtemp(prefix="gradio-")  # Gradio's copies of the served files, removed with the server
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=cache)
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "ldm.app", *flags, "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(process, url, log, timeout)
        yield url
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        shutil.rmtree(cache, ignore_errors=True)


def wait_until_serving(process: subprocess.Popen, url: str, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"ldm.app exited with {process.returncode}:\n{log.read().decode()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"ldm.app did not answer at {url} within {timeout} s")


def chromium(profile_dir: str, download_dir: str) -> webdriver.Chrome:
    """Headless Chromium with a fresh profile in (empty) `profile_dir`, saving downloads to `download_dir`
    without asking."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": download_dir,
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # for requested_urls
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def requested_urls(driver: webdriver.Chrome) -> set[str]:
    """The URLs the browser's pages asked for since the last call (Chromium's performance log)."""
    messages = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return {message["params"]["request"]["url"] for message in messages
            if message["method"] == "Network.requestWillBeSent"}


def wait_for(driver: webdriver.Chrome, condition, timeout: float = 120):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def type_into(driver: webdriver.Chrome, elem_id: str, text: str) -> None:
    """Replace the text of the form field with elem_id `elem_id` (its text or number box; a slider's box)."""
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input[type=number]")
    field.clear()
    field.send_keys(text)


def captions(driver: webdriver.Chrome) -> list[str]:
    """The gallery's captions (each image's parameters), as its thumbnails' alt texts."""
    return [image.get_attribute("alt") for image in driver.find_elements(By.CSS_SELECTOR, THUMBNAILS)]


THUMBNAILS = "#gallery button.thumbnail-lg img"


def generate(driver: webdriver.Chrome, images: int) -> list[str]:
    """Click Generate and wait for `images` new thumbnails (their captions must change: ask for another
    seed or setting than the gallery shows); returns their captions."""
    before = captions(driver)
    driver.find_element(By.ID, "generate").click()

    def drawn(driver: webdriver.Chrome) -> list[str] | None:
        now = captions(driver)
        return now if len(now) == images and now != before else None
    return wait_for(driver, drawn)


def error_messages(driver: webdriver.Chrome) -> list[str]:
    return [toast.text for toast in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")]


def download_first_image(driver: webdriver.Chrome, download_dir: str, timeout: float = 30) -> str:
    """Open the first image in the gallery's preview and press its Download button; returns the file."""
    driver.find_element(By.CSS_SELECTOR, "#gallery button.thumbnail-item").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery button[aria-label='Download']"))
    driver.find_element(By.CSS_SELECTOR, "#gallery button[aria-label='Download']").click()
    done = lambda _: [name for name in os.listdir(download_dir) if name.endswith(".png")]  # noqa: E731
    (name,) = wait_for(driver, done, timeout)
    return os.path.join(download_dir, name)

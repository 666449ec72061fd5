"""The web page in a real browser: `python scripts/app.py` started as README says (on a free port),
driven by Debian's headless Chromium through Selenium. It types a prompt, generates, waits for the
images, checks both rows and a bad value's message, and that the page asked nothing of any host but
its own server, while the server runs with the network cut off (tests/offline_run.py). A missing
Chromium or chromedriver is a failure: .ci/run installs them.

APP_SCREENSHOT=assets/app-page.png python -m pytest tests/test_app_browser.py   # README's screenshot
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.offline_run import OFFLINE_MARK

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "apt-get install -y chromium chromium-driver (.ci/run does)"
PROMPT = "a lamp"
IMAGES, STEPS = 3, 8  # a few CPU seconds on the demo model


def find_program(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    pytest.fail(f"{' or '.join(names)} not found: the browser test needs Debian's Chromium; {INSTALL}")


@dataclass
class Server:
    url: str
    output: list[str]  # every line the server has printed so far


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """scripts/app.py on a free port with the demo model and the network cut off (tests/offline_run.py);
    its address is read from what it prints."""
    outdir = tmp_path_factory.mktemp("app-browser")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "tests" / "offline_run.py"), str(ROOT / "scripts" / "app.py"),
               "--port", "0", "--device", "cpu", "--outdir", str(outdir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=tmp_path_factory.mktemp("cwd"))
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("The page is at" in line for line in output):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("scripts/app.py printed no address within 60 s: " + "".join(output))
            time.sleep(0.1)
        address = next(line for line in output if "The page is at" in line)
        yield Server(address.split("The page is at ")[1].split()[0], output)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = find_program("chromium", "chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,1500"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    # the driver's path given: Selenium would otherwise try to download one
    driver = webdriver.Chrome(options=options, service=Service(executable_path=find_program("chromedriver")))
    driver.get(server.url)
    yield driver
    driver.quit()


def field(driver, flag: str):
    return driver.find_element(By.CSS_SELECTOR, f'[data-flag="{flag}"]')


def type_into(element, text: str) -> None:
    element.clear()
    element.send_keys(text)


def images_loaded(driver) -> bool:
    return driver.execute_script(
        "const images = [...document.querySelectorAll('#grid img')];"
        "return images.length > 0 && images.every((image) => image.complete && image.naturalWidth > 0);")


def test_a_generation_shows_the_same_seeds_without_and_with_sharing(browser, tmp_path):
    type_into(browser.find_element(By.ID, "prompt"), PROMPT)
    type_into(field(browser, "--n_samples"), str(IMAGES))
    type_into(field(browser, "--ddim_steps"), str(STEPS))
    type_into(field(browser, "--seed"), "3")
    assert browser.find_element(By.ID, "group-all").is_selected()  # sharing is on by default
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid tr.grid-row")
                                     and images_loaded(d))
    rows = browser.find_elements(By.CSS_SELECTOR, "#grid tr.grid-row")
    assert [row.find_element(By.TAG_NAME, "th").text for row in rows] == ["no sharing (seeds 3-5)",
                                                                          "shared (seeds 3-5)"]
    for row in rows:
        links = row.find_elements(By.CSS_SELECTOR, "a[download]")
        assert len(links) == IMAGES and all(link.get_attribute("href").endswith(".png") for link in links)
    captions = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#grid th.caption")]
    assert captions == [f"{PROMPT} (seed {seed})" for seed in (3, 4, 5)]
    progress = browser.find_element(By.ID, "progress")
    # two batches of STEPS steps: without and with sharing
    assert progress.get_attribute("value") == progress.get_attribute("max") == str(2 * STEPS)
    assert "--shared-attn all --compare" in browser.find_element(By.ID, "command").text
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    browser.save_screenshot(str(tmp_path / "app-page.png"))
    if os.environ.get("APP_SCREENSHOT"):  # the whole page, both rows included
        height = browser.execute_script("return document.documentElement.scrollHeight;")
        browser.set_window_size(1200, height + 120)  # + the window's own bars
        browser.save_screenshot(os.environ["APP_SCREENSHOT"])


def test_a_bad_value_shows_one_line_on_the_page(browser):
    type_into(field(browser, "--shared-attn-strength"), "inf")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 20).until(lambda d: error.is_displayed() and error.text)
    assert error.text.startswith("error: --shared-attn-strength inf: ") and "\n" not in error.text
    type_into(field(browser, "--shared-attn-strength"), "")


def test_the_page_requests_nothing_but_its_own_server(browser, server):
    browser.get(server.url)  # once more, so this test alone also sees the page load
    urls = [json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in browser.get_log("performance")
            if json.loads(entry["message"])["message"]["method"] == "Network.requestWillBeSent"]
    assert server.url in urls
    assert [url for url in urls if not (url.startswith(server.url) or url.startswith("data:"))] == []


def test_the_server_works_with_the_network_cut_off(browser, server):
    assert not [line for line in server.output if OFFLINE_MARK in line]

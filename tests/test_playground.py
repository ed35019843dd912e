"""The playground page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium
against infer.py serve on the session's trained run: tuned is its q4_k_m GGUF, base the embedded GGUF.

Under CI (the CI variable set, as .ci/run does) a missing browser fails the test; elsewhere it skips, naming the
install command.
"""

from __future__ import annotations

import os
import shutil

import pytest
from test_serve import KEY, Server

INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"


def _missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what}; CI must run the browser test: {INSTALL}")
    pytest.skip(f"{what}; to run the browser test: {INSTALL}")


@pytest.fixture(scope="session")  # session: set up before trained_run, so a missing browser skips before training
def browser():
    """Headless Chromium through the system's chromedriver; Selenium Manager never runs (it would download one)."""
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager, if ever reached, stays offline
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -r requirements-cpu.txt)")
    driver_path, chromium = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver_path and chromium):
        _missing("chromium or chromedriver is not on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)
    except TimeoutException:
        text = driver.find_element("tag name", "body").text
        raise AssertionError(f"{what} within {seconds} s; the page shows:\n{text}") from None


def test_a_question_fills_three_answers_and_shows_what_rag_retrieved(browser, trained_run, tmp_path):
    """Base, tuned and tuned + RAG answer one question about a trained product, base and tuned differently, and the
    product's title shows under the tuned + RAG answer, as text."""
    from selenium.webdriver.common.by import By

    from titletune.runs import read_split

    title = read_split(trained_run, "train")[0]["title"]  # the first example asks about it

    with Server("--run", str(trained_run)) as server:
        browser.get(f"{server.url}/")
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), 60, "no page data")
        examples = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#examples button.example")]
        assert len(examples) == 4 and all(examples), examples
        for knob, value in (("temperature", "0"), ("max-tokens", "48")):  # greedy: repeatable answers
            field = browser.find_element(By.ID, knob)
            field.clear()
            field.send_keys(value)
        browser.find_element(By.ID, "question").send_keys(examples[0])  # a product the tuned model was trained on
        browser.find_element(By.ID, "send").click()
        panes = [browser.find_element(By.ID, f"pane-{m}") for m in ("base", "tuned", "rag")]
        assert all(p.is_displayed() for p in panes)
        wait(
            browser,
            lambda d: all(p.get_attribute("data-state") in ("done", "error") for p in panes),
            180,
            "no answers",
        )
        browser.save_screenshot(str(tmp_path / "playground.png"))
        base, tuned, rag = (browser.find_element(By.ID, f"answer-{m}").text.strip() for m in ("base", "tuned", "rag"))
        retrieved = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#retrieved-rag li")]
        tops = {p.get_attribute("id"): p.rect["y"] for p in panes}
    assert [p.get_attribute("data-state") for p in panes] == ["done", "done", "done"], (base, tuned, rag)
    assert base and tuned and rag and base != tuned, (base, tuned, rag)
    assert retrieved[:1] == [title], retrieved
    assert len(set(tops.values())) == 1, tops  # three columns side by side, not stacked
    assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_with_an_api_key_the_page_asks_for_it_or_takes_it_from_the_fragment(browser, trained_run):
    from selenium.webdriver.common.by import By

    with Server("--run", str(trained_run), "--api-key", KEY) as server:
        browser.get(f"{server.url}/")
        key_box = browser.find_element(By.ID, "key-box")
        wait(browser, lambda d: key_box.is_displayed(), 30, "no key box")
        assert browser.find_element(By.ID, "send").get_attribute("disabled") is not None
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.ID, "api-key-save").click()
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), 30, "key refused")
        browser.get("about:blank")  # a new document: from / to /#key=... alone would not reload the page
        browser.get(f"{server.url}/#key={KEY}")
        wait(
            browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), 30, "fragment ignored"
        )
        assert KEY not in browser.current_url  # the page takes the key out of the address bar

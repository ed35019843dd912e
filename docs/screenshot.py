"""Make docs/playground.png: the playground of a real run, one question answered by every model served, in headless
Chromium (Debian's chromium + chromium-driver, driven by Selenium, as tests/test_playground.py does).

    .venv/bin/python docs/screenshot.py --run outputs/<run> --question "What is 'Girls Ballet Tutu Neon Pink'?"

The PNG is quantized to 48 colours with Pillow (matplotlib's dependency) so that it stays small in the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run folder with a GGUF")
    parser.add_argument("--question", help="what to ask (default: the page's first example)")
    parser.add_argument("--max-tokens", default="64", help="the page's max tokens knob")
    parser.add_argument("--out", default=str(ROOT / "docs" / "playground.png"))
    args = parser.parse_args()
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a driver
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "infer.py"), "--serve", "--run", args.run, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "v1/models", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(0.5)
        driver.get(url)
        wait = WebDriverWait(driver, 300, poll_frequency=0.2)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        question = args.question or driver.find_element(By.CSS_SELECTOR, "#examples button.example").text
        for knob, value in (("temperature", "0"), ("max-tokens", args.max_tokens)):
            field = driver.find_element(By.ID, knob)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.ID, "question").send_keys(question)
        driver.find_element(By.ID, "send").click()
        panes = [p for p in driver.find_elements(By.CSS_SELECTOR, ".pane") if p.is_displayed()]  # tuned + RAG too
        wait.until(lambda d: all(p.get_attribute("data-state") in ("done", "error") for p in panes))
        raw = Path(args.out).with_suffix(".raw.png")
        driver.save_screenshot(str(raw))
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    Image.open(raw).convert("RGB").quantize(colors=48).save(args.out, optimize=True)
    raw.unlink()
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB): {question}")


if __name__ == "__main__":
    main()

"""Regenerate docs/playground.png: serve the default (real) pair, ask the playground's default question in
headless Chromium, and save the page once both panes have finished.

    RAY_AUTH_MODE=disabled .venv/bin/python scripts/screenshot_playground.py [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from helix_serve.serving.app import build_app
from helix_serve.serving.local import local_serve
from tests.test_playground import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, PANES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/playground.png")
    parser.add_argument("--max-tokens", default="64")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory() as profile:
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        with local_serve(build_app({"device": "cpu"})) as url:  # the defaults: SmolLM2 and its distilled draft
            browser = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
            try:
                browser.get(url + "/")
                field = browser.find_element(By.ID, "max_tokens")
                field.clear()
                field.send_keys(args.max_tokens)
                browser.find_element(By.ID, "run").click()
                states = f"return {list(PANES)}.map(id => document.getElementById(id).dataset.state)"
                WebDriverWait(browser, 600, poll_frequency=0.5).until(
                    lambda b: all(s in ("done", "error") for s in b.execute_script(states)))
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(args.out)
                print(browser.find_element(By.ID, "speedup").text, "→", args.out)
            finally:
                browser.quit()


if __name__ == "__main__":
    main()

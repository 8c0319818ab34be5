"""The playground page in headless Chromium (Debian's chromium + chromium-driver) against a real local Serve app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from helix_serve.serving.app import build_app
from tests.serve_harness import CLUSTER, app_args

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# With fixed K the random tiny pair accepts some drafts on this prompt (about one in five).
PROMPT = "speculative decoding drafts"
K = 3
PANES = ("pane-spec", "pane-plain")
# Without the background-networking flags Chromium keeps dialling Google, which this closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def base_url(llama_pair):
    with CLUSTER.serving(build_app(app_args(llama_pair))) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    # A missing browser is a broken environment, not a reason to skip.
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"not installed: {missing}; apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def _fill(browser: WebDriver, **values: str) -> None:
    for name, value in values.items():
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)


def _run(browser: WebDriver) -> None:
    """Click Run and wait until both panes have finished or failed."""
    browser.find_element(By.ID, "run").click()
    states = f"return {list(PANES)}.map(id => document.getElementById(id).dataset.state)"
    WebDriverWait(browser, 40, poll_frequency=0.1).until(
        lambda b: all(s in ("done", "error") for s in b.execute_script(states)))


def _pane(browser: WebDriver, pane: str) -> dict:
    return browser.execute_script("""
        const root = document.getElementById(arguments[0]);
        const counters = Object.fromEntries(
            [...root.querySelectorAll('[data-counter]')].map(el => [el.dataset.counter, el.textContent]));
        const tokens = [...root.querySelectorAll('.output .tok')].map(el => el.className);
        return {state: root.dataset.state, text: root.querySelector('.output').textContent,
                error: root.querySelector('.error').textContent, counters, tokens};
    """, pane)


def test_page_streams_both_panes_like_generate(base_url, browser, tmp_path):
    request = {"prompt": PROMPT, "max_tokens": 48, "num_speculative_tokens": K}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        expected = {spec: http.post("/generate", json={**request, "speculative": spec}).json()["generated_text"]
                    for spec in (True, False)}
    assert expected[True] == expected[False] != ""  # greedy: speculation must not change the text

    browser.get(base_url + "/")
    browser.find_element(By.ID, "adaptive").click()  # off: a fixed K keeps drafting on this weak pair
    browser.find_element(By.ID, "chat").click()  # off: the tiny test pair has no chat template; continue PROMPT
    _fill(browser, prompt=PROMPT, max_tokens="48", k=str(K))
    _run(browser)
    spec, plain = (_pane(browser, p) for p in PANES)
    browser.save_screenshot(str(tmp_path / "playground.png"))

    for pane in (spec, plain):
        assert pane["state"] == "done", pane["error"]
        assert pane["text"] == expected[True]
        assert pane["counters"]["tps"] != "–" and float(pane["counters"]["tps"]) > 0
        assert pane["counters"]["ttft"].endswith(" ms")
    assert spec["counters"]["acceptance"].endswith(" %")
    assert 0 <= int(spec["counters"]["k"]) <= K  # the last chunks draft fewer as max_tokens nears
    assert plain["counters"]["acceptance"] == "n/a" and plain["counters"]["k"] == "0"
    assert any("accepted" in t for t in spec["tokens"]) and all(t == "tok target" for t in plain["tokens"])
    assert browser.find_element(By.ID, "speedup").text.startswith("Speedup: ×")


def test_api_error_is_shown_in_the_page(base_url, browser):
    browser.get(base_url + "/")
    _fill(browser, prompt=PROMPT, max_tokens="0")
    _run(browser)
    for pane in PANES:
        shown = _pane(browser, pane)
        assert shown["state"] == "error"
        assert shown["error"].startswith("HTTP 422: ") and "max_tokens" in shown["error"]
    assert "n/a" in browser.find_element(By.ID, "speedup").text


SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "n"], "additionalProperties": False}


def test_schema_box_constrains_both_panes(base_url, browser):
    fmt = {"type": "json_schema", "json_schema": {"name": "playground", "schema": SCHEMA}}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        reply = http.post("/generate", json={"prompt": PROMPT, "max_tokens": 32, "response_format": fmt})
    expected = reply.json()["generated_text"]
    assert json.loads(expected)["colour"] in ("red", "green")

    browser.get(base_url + "/")
    browser.find_element(By.ID, "chat").click()
    _fill(browser, prompt=PROMPT, max_tokens="32", schema=json.dumps(SCHEMA))
    _run(browser)
    for pane in PANES:
        shown = _pane(browser, pane)
        assert shown["state"] == "done" and shown["text"] == expected, shown["error"]
    assert browser.find_element(By.ID, "form-error").get_attribute("hidden") is not None


def test_schema_box_that_is_not_json_is_shown_not_sent(base_url, browser):
    browser.get(base_url + "/")
    _fill(browser, prompt=PROMPT, schema='{"type": ')
    browser.find_element(By.ID, "run").click()
    error = browser.find_element(By.ID, "form-error")
    WebDriverWait(browser, 5, poll_frequency=0.1).until(lambda b: error.is_displayed())
    assert error.text.startswith("JSON schema: not valid JSON (")
    assert all(_pane(browser, p)["state"] == "idle" for p in PANES)  # no request was made
    assert not browser.find_element(By.ID, "run").get_attribute("disabled")

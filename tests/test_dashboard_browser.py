"""`latentstore dashboard` in a real browser: headless Debian Chromium driven by selenium.

The pages must load without console errors, show the store's numbers, navigate, and show
hostile token text as text without running it. Screenshots of each page go to
``$LATENTSTORE_SCREENSHOTS`` (or the test's temporary folder) to be looked at.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from jobs.dashboard import write_dashboard
from store import FeatureStore
from test_export_neuronpedia import HOOK, small_store  # the same small store, extracted once

pytestmark = pytest.mark.ray
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Debian's chromium, headless, with nothing that reaches the network
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1300,1000")
HOSTILE = {"the": "<script>window.__xss = 1</script>", "cat": '"><img src=x onerror="window.__xss = 2">',
           "sat": "<b onmouseover=window.__xss=3>bold</b>&amp;"}


@pytest.fixture(scope="module")
def site(assets, ray_cluster, tmp_path_factory) -> tuple[Path, FeatureStore]:
    root = tmp_path_factory.mktemp("dashboard")
    fs = small_store(assets, tmp_path_factory)
    # the tokenizer cannot make such tokens, so give three common ones hostile text
    fs.__dict__["vocab"] = [HOSTILE.get(text, text) for text in fs.vocab]
    write_dashboard(fs, HOOK, root / "site", max_rows=20)
    return root / "site", fs


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site[0]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output for failures
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed: apt-get install -y chromium "
                    "chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LATENTSTORE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def visit(browser, url: str, ready: str) -> None:
    """Open ``url`` and wait until ``ready`` (a JavaScript expression) holds."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 15).until(lambda d: d.execute_script(f"return Boolean({ready});"))


def wait_for(browser, ready: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 15).until(lambda d: d.execute_script(f"return Boolean({ready});"))


def click(browser, element) -> None:
    """Click as a reader would, with the element scrolled out from under the sticky header."""
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def console_errors(browser) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


FEATURE_SHOWN = "!document.getElementById('feature').hidden && document.querySelector('#groups .example')"


def counted_counts(fs: FeatureStore) -> np.ndarray:
    """Each feature's activations on tokens other than special ones, as the pages count them."""
    counted = ~np.isin(fs.token_ids(), list(fs.special_token_ids))
    return np.asarray((fs.csr(HOOK)[counted] > 0).sum(0)).ravel()


def busiest(fs: FeatureStore) -> int:
    return int(np.argmax(counted_counts(fs)))


def test_feature_page_shows_the_stores_top_examples_and_numbers(site, server, browser, shots):
    _, fs = site
    feature = busiest(fs)
    visit(browser, f"{server}/feature.html#{feature}", FEATURE_SHOWN)
    browser.save_screenshot(str(shots / "feature.png"))
    assert console_errors(browser) == []
    top = fs.top_activations(HOOK, feature, k=20)
    shown = browser.execute_script("""
        return [...document.querySelectorAll('.group-top .example')].map(e => ({
            value: e.querySelector('.value').title,
            where: e.querySelector('.where').textContent,
            active: e.querySelector('.tok.active').textContent,
            title: e.querySelector('.tok.active').title}));""")
    assert len(shown) == len(top) == 20
    ids = fs.token_ids()
    for example, (_, expected) in zip(shown, top.iterrows()):
        assert float(example["value"]) == expected["activation"]
        assert example["where"] == f"row {expected['row']} · pos {expected['pos']}"
        text = fs.vocab[ids[expected["token_index"]]]
        assert example["active"] == text.replace("\n", "\u21b5")
        quoted, value = example["title"].split("  activation ")
        assert json.loads(quoted) == text and float(value) == expected["activation"]
    n = fs.feature_activations(HOOK, feature, exclude_special_tokens=True).shape[0]
    stats = browser.find_element("id", "stats").text
    assert stats.startswith(f"Fires on {n:,} of {fs.n_tokens:,} tokens")
    assert f", {n / fs.n_tokens!r})" in stats  # the density at full precision
    groups = browser.execute_script("return document.querySelectorAll('#groups .group').length")
    assert groups == 1 + fs.quantile_samples(HOOK, feature, method="rank")["group"].nunique()
    bars = browser.execute_script("return document.querySelectorAll('#act-hist rect').length")
    assert bars == 50
    logits = browser.execute_script("return document.querySelectorAll('#logits tbody tr').length")
    assert logits == 10
    cofiring = browser.execute_script("return [...document.querySelectorAll('#cofiring .feature-link')]"
                                      ".map(a => a.textContent)")
    assert cofiring == [f"#{f}" for f in fs.cofiring(HOOK, feature, k=10)["feature"]]


def test_navigation_search_and_prompt_page(site, server, browser, shots):
    _, fs = site
    feature = busiest(fs)
    visit(browser, f"{server}/index.html", "document.querySelector('#busiest .feature-link')")
    browser.save_screenshot(str(shots / "index.png"))
    first = browser.find_element("css selector", "#busiest .feature-link")
    assert first.text == f"#{feature}"
    density = browser.find_element("css selector", "#busiest tbody tr td:nth-child(2)").text
    click(browser, first)
    wait_for(browser, FEATURE_SHOWN)
    # the front page's density is the feature page's: special tokens are counted on neither
    n = int(counted_counts(fs)[feature])
    assert f"(density {density}, {n / fs.n_tokens!r})" in browser.find_element("id", "stats").text
    assert browser.find_element("id", "title").text == f"{HOOK} · feature {feature}"
    click(browser, browser.find_element("id", "next"))
    wait_for(browser, f"document.getElementById('title').textContent.endsWith('feature {feature + 1}')")
    box = browser.find_element("id", "search-input")
    box.clear()
    box.send_keys("7\n")
    wait_for(browser, "document.getElementById('title').textContent.endsWith('feature 7')")
    assert browser.current_url.endswith("feature.html#7")
    box = browser.find_element("id", "search-input")
    box.clear()
    box.send_keys(f"{fs.d_sae(HOOK) + 5}\n")
    wait_for(browser, "document.getElementById('message').textContent.includes('has pages for features 0 to 95')")
    visit(browser, f"{server}/feature.html#{feature}", FEATURE_SHOWN)
    click(browser, browser.find_element("css selector", "#cofiring .feature-link"))
    other = int(fs.cofiring(HOOK, feature, k=1)["feature"][0])
    wait_for(browser, f"document.getElementById('title').textContent.endsWith('feature {other}')")
    wait_for(browser, FEATURE_SHOWN)
    row_link = browser.find_element("css selector", "#groups .where a")
    row = int(row_link.text.split()[1])
    click(browser, row_link)
    wait_for(browser, "document.querySelector('#per-token tbody tr')")
    browser.save_screenshot(str(shots / "prompt.png"))
    expected = fs.prompt_features(row, HOOK, k=5)
    first_token = expected[expected["token_index"] == expected["token_index"].min()]
    shown = browser.execute_script("return [...document.querySelectorAll('#per-token tbody tr')[0]"
                                   ".querySelectorAll('.feature-link')].map(a => a.textContent)")
    assert shown == [f"#{f}" for f in first_token["feature"]]
    n_tokens = browser.execute_script("return document.querySelectorAll('#prompt .tok').length")
    assert n_tokens == int((fs.provenance()["row"] == row).sum())
    click(browser, browser.find_element("css selector", "#per-token .feature-link"))
    wait_for(browser, FEATURE_SHOWN)
    assert console_errors(browser) == []


def test_hostile_token_text_is_shown_and_never_runs(site, server, browser, shots):
    from selenium.webdriver.common.action_chains import ActionChains

    _, fs = site
    hostile_ids = [fs.vocab.index(text) for text in HOSTILE.values()]
    row = next(int(r) for r in np.unique(fs.provenance()["row"])[:20]
               if np.isin(fs.token_ids()[fs.provenance()["row"].to_numpy() == r], hostile_ids).sum() >= 2)
    feature = busiest(fs)
    for url, ready in [(f"{server}/feature.html#{feature}", FEATURE_SHOWN),
                       (f"{server}/prompt.html#{row}", "document.querySelector('#per-token tbody tr')")]:
        visit(browser, url, ready)
        text = browser.find_element("tag name", "body").text
        assert all(h in text for h in HOSTILE.values())
        hovered = browser.execute_script("return [...document.querySelectorAll('main .tok')]"
                                         ".filter(e => e.textContent.includes('onmouseover')).slice(0, 3)")
        assert hovered
        for element in hovered:  # a hover must not run it either
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
            ActionChains(browser).move_to_element(element).perform()
        assert browser.execute_script("return window.__xss") is None
        assert browser.execute_script("return document.querySelectorAll('main img, main script, main b').length") == 0
        assert console_errors(browser) == []
    browser.save_screenshot(str(shots / "hostile.png"))


def test_works_from_file_urls_without_a_server(site, browser, shots, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(site[0], copy)
    feature = busiest(site[1])
    visit(browser, f"{copy.as_uri()}/feature.html#{feature}", FEATURE_SHOWN)
    assert browser.find_element("id", "title").text == f"{HOOK} · feature {feature}"
    assert console_errors(browser) == []
    browser.save_screenshot(str(shots / "feature-file-url.png"))

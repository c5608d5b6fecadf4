"""`latentstore dashboard --serve`: typed prompts through the run's model, in a real browser too.

The endpoint's features equal sae_lens's own forward with the SAE attached; the prompt page
shows the box only when the server is there, renders an answer as a dataset row is rendered
(token text as text), and links to feature pages. The CLI serves and stops on Ctrl-C.
"""

from __future__ import annotations

import copy
import http.server
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.cli import main
from jobs.dashboard import write_dashboard
from jobs.dashboard_serve import PromptServer, is_loopback
from pipeline.models import load_model
from pipeline.prompts import PromptEncoder
from pipeline.saes import SAESource, load_sae
from store.errors import ConfigError
from test_dashboard_browser import browser, shots  # noqa: F401 (fixtures)
from test_dashboard_browser import FEATURE_SHOWN, _QuietHandler, click, console_errors, visit, wait_for
from test_export_neuronpedia import HOOK, small_store

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BF16 = 2.0 ** -8  # bfloat16's relative rounding error
# the word-level tokenizer makes no such tokens, so two common words are given hostile text
HOSTILE = {"cat": "<img src=x onerror=alert(1)>", "dog": "<script>window.__xss = 1</script>"}
TEXT = "the cat sat on the mat and then it was a big red fox"  # 13 tokens: fits a window of 16 with BOS


@pytest.fixture(scope="module")
def served(assets, ray_cluster, tmp_path_factory):
    """The site of a small store served with its model; yields (url, store, encoder, site)."""
    fs = small_store(assets, tmp_path_factory)
    fs.__dict__["vocab"] = [HOSTILE.get(text, text) for text in fs.vocab]
    site = tmp_path_factory.mktemp("served") / "site"
    write_dashboard(fs, HOOK, site, max_rows=20)
    encoder = PromptEncoder(fs.run, HOOK, device="cpu")
    server = PromptServer(("127.0.0.1", 0), site, encoder, fs.vocab)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url, fs, encoder, site
    server.shutdown()
    server.server_close()
    thread.join()


def request(url: str, body: bytes | None = None, headers: dict | None = None,
            method: str | None = None) -> tuple[int, str]:
    """(status, text) of a GET, or of a POST when ``body`` is given, or of ``method``; error statuses too."""
    return answer(url, body, headers, method)[:2]


def answer(url: str, body: bytes | None = None, headers: dict | None = None,
           method: str | None = None) -> tuple[int, str, dict]:
    """``request``'s status and text, and the response's headers."""
    headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else headers or {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method=method),
                                    timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def prompt(url: str, text: str) -> dict:
    status, answer = request(f"{url}/api/prompt", json.dumps({"text": text}).encode())
    assert status == 200, answer
    return json.loads(answer)


def reference(assets, fs, token_ids: list[int]) -> np.ndarray:
    """The SAE's activations [tokens, d_sae] from sae_lens's forward with the SAE attached."""
    source = fs.sae_record(HOOK)["source"]
    model = load_model(str(assets["model_dir"]))
    sae = load_sae(SAESource.parse(source))
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(torch.tensor([token_ids]), saes=[sae], use_error_term=True)
    return cache[f"{HOOK}.hook_sae_acts_post"][0].float().numpy()


def top(dense_row: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """The k largest positive values, ties to the lower feature."""
    return sorted(((-v, f) for f, v in enumerate(dense_row) if v > 0))[:k]


def test_prompt_features_equal_sae_lens_with_the_sae_attached(served, assets):
    url, fs, encoder, _ = served
    answer = prompt(url, TEXT)
    bos = assets["tokenizer"].bos_token_id
    ids = [bos] + assets["tokenizer"](TEXT, add_special_tokens=False)["input_ids"]
    assert fs.run["prepend_bos"] and fs.value_dtype == "bfloat16"
    assert answer["token_ids"] == ids
    assert answer["pos"] == list(range(-1, len(ids) - 1))
    assert answer["tokens"] == [fs.vocab[i] for i in ids]
    expected = reference(assets, fs, ids)
    rounded = torch.from_numpy(expected).to(torch.bfloat16).float().numpy()  # as the store keeps them
    for token, shown in enumerate(answer["features"]):
        want = top(rounded[token])
        assert [f for f, _ in shown] == [f for _, f in want]
        np.testing.assert_allclose([v for _, v in shown], expected[token, [f for _, f in want]], rtol=BF16, atol=0)
    assert sum(map(len, answer["features"])) > 3 * len(ids)  # the prompt lights up enough to test
    # every active feature, not only the top 5: the same features at the same tokens
    full = encoder(TEXT)
    dense = np.zeros_like(expected)
    for t in range(len(ids)):
        dense[t, full.indices[full.indptr[t]:full.indptr[t + 1]]] = full.values[full.indptr[t]:full.indptr[t + 1]]
    np.testing.assert_array_equal(dense != 0, expected != 0)
    np.testing.assert_allclose(dense, expected, rtol=BF16, atol=0)


def test_a_dataset_row_typed_gives_the_stores_numbers(served, assets):
    url, fs, _, _ = served
    row = next(i for i, text in enumerate(assets["texts"]) if 8 <= len(text.split()) <= 15)
    answer = prompt(url, assets["texts"][row])
    stored = fs.prompt_features(row, HOOK, k=5)
    by_token = [list(zip(group["feature"], group["activation"])) for _, group in stored.groupby("token_index")]
    assert len(answer["features"]) == len(by_token) == len(answer["tokens"])
    for shown, kept in zip(answer["features"], by_token):
        assert [f for f, _ in shown] == [int(f) for f, _ in kept]
        # a batch of windows and one window may round the last bit apart on some CPUs
        np.testing.assert_allclose([v for _, v in shown], [v for _, v in kept], rtol=2 * BF16, atol=0)


def test_requests_are_checked_and_answered_with_a_reason(served):
    url, fs, _, _ = served
    cases = [
        (b"{not json", {}, 400, "the body is not JSON"),
        (b'{"txt": "the cat"}', {}, 400, 'a JSON object with the prompt as a string: {"text": "..."}'),
        (b'["the cat"]', {}, 400, "a JSON object"),
        (b'{"text": 7}', {}, 400, "a JSON object"),
        (json.dumps({"text": " ".join(["cat"] * 16)}).encode(), {}, 400,
         "the prompt is 16 tokens long; this run's windows hold 16 tokens, one of them the BOS it starts with, "
         "so at most 15 tokens of text. Shorten the prompt."),
        (b'{"text": ""}', {}, 400, "the prompt makes no tokens: type some text."),
        (b'{"text": "cat"}', {"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
        (b'{"text": "cat"}', {"Host": "attacker.example"}, 403, "not to host 'attacker.example'"),
    ]
    for body, headers, status, message in cases:
        got, text = request(f"{url}/api/prompt", body, headers)
        assert (got, message in json.loads(text)["error"]) == (status, True), (body, text)
    assert prompt(url, " ".join(["cat"] * 15))["pos"] == list(range(-1, 15))  # the longest that fits
    got, text = request(f"{url}/api/nothing", b"{}")
    assert got == 404 and "POST to /api/prompt" in json.loads(text)["error"]
    info = {"sae": HOOK, "hook": HOOK, "model": fs.run["model"]["name"], "max_tokens": 15, "k": 5}
    assert request(f"{url}/api/info") == (200, json.dumps(info))
    assert request(f"{url}/server.js") == (200, f'LS.receive("server",{json.dumps(info)});\n')
    assert request(f"{url}/api/info", headers={"Host": "attacker.example:80"})[0] == 403
    assert request(f"{url}/api/info", headers={"Host": "localhost"})[0] == 200
    got, text = request(f"{url}/api/prompt", b'{"text": "the \\ud800 cat"}')  # a lone surrogate, as JSON allows
    assert got == 400 and "the text is not valid Unicode (surrogates not allowed at character 4)" in text, text
    for method in ("GET", "PUT", "DELETE"):
        got, text = request(f"{url}/api/prompt", method=method)
        assert got == 405 and "POST to /api/prompt" in json.loads(text)["error"], method


def test_head_answers_as_get_would_without_a_body(served):
    url, _, _, _ = served
    for path in ("/api/info", "/server.js", "/index.html"):
        status, text, headers = answer(f"{url}{path}")
        assert (status, len(text.encode())) == (200, int(headers["Content-Length"])), path
        status, text, head_headers = answer(f"{url}{path}", method="HEAD")
        same = lambda h: {k: v for k, v in h.items() if k != "Date"}  # noqa: E731 (the clock may tick between)
        assert (status, text, same(head_headers)) == (200, "", same(headers)), path
    assert request(f"{url}/api/info", method="HEAD", headers={"Host": "attacker.example"}) == (403, "")
    assert request(f"{url}/nothing.html", method="HEAD") == (404, "")


def test_a_client_that_stops_sending_gets_408_not_a_thread_held_forever(served, monkeypatch):
    import socket

    from jobs.dashboard_serve import PromptHandler

    url, _, _, _ = served
    monkeypatch.setattr(PromptHandler, "timeout", 1)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(b"POST /api/prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"text\"")  # 9 of the 100 bytes promised
        chunks = []
        while chunk := client.recv(65536):  # headers and body may come apart; the server closes after them
            chunks.append(chunk)
        answer = b"".join(chunks).decode()
    assert answer.startswith("HTTP/1.0 408") and "the request's 100 bytes did not arrive within 1 s." in answer, answer


def test_encoder_names_the_saes_and_says_when_weights_changed(served, caplog):
    _, fs, _, _ = served
    with pytest.raises(ConfigError, match=r"the run has no SAE named 'blocks.9.hook_resid_post'; "
                                          r"its SAEs: blocks.0.hook_resid_post"):
        PromptEncoder(fs.run, "blocks.9.hook_resid_post", device="cpu")
    with caplog.at_level(logging.WARNING, logger="pipeline.prompts"):
        PromptEncoder(fs.run, HOOK, device="cpu")
    assert caplog.records == []  # the weights are the extraction's
    run = copy.deepcopy(fs.run)
    run["model"]["weights_hash"] = "sha256:" + "0" * 64
    with caplog.at_level(logging.WARNING, logger="pipeline.prompts"):
        PromptEncoder(run, HOOK, device="cpu")
    assert [r.getMessage() for r in caplog.records] == [
        f"the model {run['model']['name']} is not the one the store was extracted with (its weights hash "
        "differs): typed prompts' activations will not match the store's."]


def test_a_busy_port_is_named_and_loopback_is_told_apart(served):
    url, _, encoder, site = served
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port} \(.*\). Give another --port"):
        PromptServer(("127.0.0.1", port), site, encoder, None)
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "0.0.0.0", "192.0.2.1", "")] == \
        [True, True, True, False, False, False]


def test_a_server_on_every_interface_still_refuses_other_sites_names(served, caplog):
    """Listening beyond loopback, the server answers this machine's addresses and names, never the
    name of another site (a page of it, opened in a browser here, could otherwise reach the server)."""
    import socket

    _, _, encoder, site = served
    server = PromptServer(("0.0.0.0", 0), site, encoder, None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        for host, status in [("attacker.example", 403), ("192.0.2.1", 200), (socket.gethostname(), 200),
                             ("localhost", 200), ("[::1", 400)]:
            got, text = request(f"{url}/api/info", headers={"Host": host})
            assert got == status, (host, text)
        assert "not to host 'attacker.example'" in request(f"{url}/api/info", headers={"Host": "attacker.example"})[1]
        with caplog.at_level("INFO", logger="jobs.dashboard_serve"), \
                socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as client:
            # a request line that would retitle a terminal (urllib refuses to send one)
            client.sendall(b"GET /\x1b]0;PWNED\x07 HTTP/1.0\r\nHost: localhost\r\n\r\n")
            while client.recv(65536):
                pass
        assert any("/\\x1b]0;PWNED\\x07" in m for m in caplog.messages), caplog.messages
        assert not any("\x1b" in m for m in caplog.messages)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cli_serves_until_ctrl_c(served, tmp_path, capsys):
    _, fs, _, _ = served
    assert main(["dashboard", str(fs.location), "--hook", HOOK, "--out", str(tmp_path / "x"), "--port", "9"]) == 2
    assert "--port and --host say where to serve: give --serve with them." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    assert "--serve" in capsys.readouterr().out
    command = [sys.executable, "-m", "jobs.cli", "dashboard", str(fs.location), "--hook", HOOK,
               "--out", str(tmp_path / "site"), "--max-rows", "3", "--no-progress", "--serve", "--port", "0"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]
        url = re.fullmatch(r"serving on (http://127\.0\.0\.1:\d+); open \1/prompt\.html to type prompts "
                           r"\(Ctrl-C stops\)\n", lines[1])
        assert url, (lines, process.stderr.read() if process.poll() is not None else "")
        assert lines[0].startswith(f"wrote the dashboard to {tmp_path / 'site'}")
        assert prompt(url[1], TEXT)["token_ids"][:3] == [0, 2, 3]  # BOS, "the", "cat"
        assert request(f"{url[1]}/prompt.html")[0] == 200
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert (process.returncode, out, "Traceback" in err) == (0, "stopped\n", False)


def typed(browser, text: str) -> None:
    """Type ``text`` into the prompt box and press its button."""
    box = browser.find_element("id", "typed-text")
    box.clear()
    box.send_keys(text)
    click(browser, browser.find_element("css selector", "#typed button"))


def test_typed_prompt_shows_tokens_and_links_to_feature_pages(served, browser, shots):
    url, fs, _, _ = served
    visit(browser, f"{url}/prompt.html", "!document.getElementById('typed').hidden && "
                                         "document.querySelector('#per-token tbody tr')")
    assert browser.find_element("id", "typed-limit").text.startswith("up to 15 tokens; the 5 strongest features")
    typed(browser, TEXT)
    wait_for(browser, "document.getElementById('title').textContent.endsWith('typed prompt')"
                      " && document.getElementById('message').textContent === ''")
    browser.save_screenshot(str(shots / "typed-prompt.png"))
    answer = prompt(url, TEXT)
    table = browser.execute_script("""return [...document.querySelectorAll('#per-token tbody tr')].map(tr => ({
        pos: tr.cells[0].textContent, token: tr.cells[1].textContent,
        features: [...tr.querySelectorAll('.chip')].map(c => [c.firstChild.textContent, c.lastChild.title])}));""")
    assert [row["pos"] for row in table] == [str(p) for p in answer["pos"]]
    assert [row["token"] for row in table] == answer["tokens"]
    assert [[(link, float(value)) for link, value in row["features"]] for row in table] == \
        [[(f"#{f}", v) for f, v in token] for token in answer["features"]]
    assert browser.execute_script("return document.querySelectorAll('#prompt .tok').length") == len(answer["tokens"])
    feature = answer["features"][3][0][0]
    click(browser, browser.find_elements("css selector", "#per-token tbody tr")[3]
          .find_element("css selector", ".feature-link"))
    wait_for(browser, FEATURE_SHOWN)
    assert browser.find_element("id", "title").text == f"{HOOK} · feature {feature}"
    assert console_errors(browser) == []


def test_hostile_prompt_and_tokens_show_as_text(served, browser, shots):
    from selenium.webdriver.support.ui import Select

    url, fs, _, _ = served
    visit(browser, f"{url}/prompt.html#0", "!document.getElementById('typed').hidden")
    typed(browser, f"{HOSTILE['cat']} cat dog")  # 13 tokens: its punctuation splits
    wait_for(browser, "document.getElementById('title').textContent.endsWith('typed prompt')"
                      " && document.querySelector('#per-token tbody tr')")
    browser.save_screenshot(str(shots / "typed-hostile.png"))
    text = browser.find_element("tag name", "main").text  # an alert left open would fail this call
    assert HOSTILE["cat"] in text and HOSTILE["dog"] in text and "[UNK]" in text
    assert browser.execute_script("return window.__xss") is None
    assert browser.execute_script("return document.querySelectorAll('main img, main script').length") == 0
    assert console_errors(browser) == []
    typed(browser, " ".join(["cat"] * 16))
    wait_for(browser, "document.getElementById('message').textContent.includes('Shorten the prompt')")
    assert browser.execute_script("return document.querySelectorAll('#per-token tbody tr').length") == 0
    # the browser reports the 400 answer itself; the page adds no error of its own
    assert all("status of 400" in e for e in console_errors(browser))
    Select(browser.find_element("id", "row-select")).select_by_value("0")  # the row the address still names
    wait_for(browser, "document.getElementById('title').textContent.endsWith('dataset row 0')")
    n_tokens = int((fs.provenance()["row"] == 0).sum())
    assert browser.execute_script("return document.querySelectorAll('#per-token tbody tr').length") == n_tokens


def test_no_box_and_no_errors_without_the_server(served, browser, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(served[3], site)  # its own server.js, as written
    handler = lambda *args: _QuietHandler(*args, directory=str(site))  # noqa: E731
    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=static.serve_forever, daemon=True)
    thread.start()
    try:
        for page in (f"{site.as_uri()}/prompt.html", f"http://127.0.0.1:{static.server_address[1]}/prompt.html"):
            visit(browser, page, "document.querySelector('#per-token tbody tr')")
            assert browser.execute_script("return document.getElementById('typed').hidden") is True
            assert not browser.find_element("id", "typed-text").is_displayed()
            assert console_errors(browser) == []
    finally:
        static.shutdown()
        static.server_close()
        thread.join()

"""`latentstore dashboard --serve`: the written site over HTTP, and typed prompts through the run's model.

The standard library's threading HTTP server serves the site's folder as files, plus:

- ``GET /api/info``: ``{"sae", "hook", "model", "max_tokens", "k"}``, what the prompt box needs to know;
- ``GET /server.js``: the same, handed to the page as ``LS.receive("server", info)``. The written
  site's own ``server.js`` hands ``null``, so from ``file://`` or a plain static server the page
  learns that no model is there without a request that fails;
- ``POST /api/prompt`` with ``{"text": "..."}``: the prompt's tokens and the ``k`` strongest
  features at each, in the shape of a dataset row's data file (``jobs.dashboard.row_json``),
  plus ``token_ids``. Errors answer ``{"error": message}`` with a 4xx status.

The model and SAE load once, before the port opens. It listens on loopback unless told otherwise,
and answers only requests addressed to a loopback name (a page on another site that rebinds its
DNS name to 127.0.0.1 is refused).
"""

from __future__ import annotations

import functools
import http.server
import ipaddress
import json
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jobs.terminal import terminal_text
from pipeline.prompts import PromptEncoder
from store import FeatureStore
from store.errors import ConfigError, DataError
from store.tokens import TokenDisplay

log = logging.getLogger(__name__)
TOP_K = 5  # features listed per token, as on the dataset rows' pages (jobs.dashboard.row_json)
MAX_BODY_BYTES = 1 << 20  # far above any prompt that fits a window; bounds what a request makes us read
TIMEOUT_S = 30  # for a request's headers and body to arrive: a client that stops sending holds a thread no longer


class PromptServer(http.server.ThreadingHTTPServer):
    """Serves ``site`` and answers typed prompts with ``encoder``; token text shown by ``display``
    (``store.tokens``; a list of strings is taken as a store's decoded vocabulary)."""

    def __init__(self, address: tuple[str, int], site: Path, encoder: PromptEncoder,
                 display: TokenDisplay | list[str] | None):
        try:
            super().__init__(address, functools.partial(PromptHandler, directory=str(site)))
        except OSError as e:
            raise ConfigError(f"cannot listen on {address[0]}:{address[1]} ({e}). Give another --port "
                              "(0 takes any free one), or stop what is using it.") from e
        self.encoder = encoder
        self.display = display if isinstance(display, TokenDisplay) else TokenDisplay.from_decoded(display)
        self.loopback = is_loopback(self.server_address[0])
        # the names a request may give as its Host (any address of this machine too, when not loopback):
        # a page of another site that a browser here opens can reach the server only through its own
        # name (DNS rebinding), which is none of these
        self.host_names = {"localhost"} | (set() if self.loopback else
                                           {socket.gethostname().lower(), socket.getfqdn().lower()})
        self.info = {"sae": encoder.name, "hook": encoder.hook, "model": encoder.model_name,
                     "max_tokens": encoder.max_text_tokens, "k": TOP_K}
        # One forward at a time: run_with_hooks attaches its hooks to the shared model, so two
        # requests' forwards at once would each see the other's hooks.
        self.model_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def prompt_json(self, text: str) -> dict[str, Any]:
        with self.model_lock:
            prompt = self.encoder(text)
        ids = prompt.token_ids.tolist()
        return {"tokens": self.display.text(ids), "token_ids": ids, "pos": prompt.positions.tolist(),
                "features": [[[f, v] for f, v in token] for token in prompt.top(TOP_K)]}


class PromptHandler(http.server.SimpleHTTPRequestHandler):
    server: PromptServer
    timeout = TIMEOUT_S
    head_only = False  # a HEAD request: GET's status and headers, no body

    def do_HEAD(self) -> None:
        self.head_only = True
        self.do_GET()

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        path = urlsplit(self.path).path
        if path == "/api/prompt":
            self._not_allowed()
        elif path == "/api/info":
            self._send(200, "application/json", json.dumps(self.server.info))
        elif path == "/server.js":
            self._send(200, "text/javascript", f"LS.receive(\"server\",{json.dumps(self.server.info)});\n")
        else:
            super().do_HEAD() if self.head_only else super().do_GET()

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        if urlsplit(self.path).path != "/api/prompt":
            return self._error(404, f"no endpoint {self.path}: POST to /api/prompt.")
        if self.headers.get_content_type() != "application/json":
            # also makes a browser ask before a page of another origin may post here
            return self._error(415, 'send the prompt as JSON (Content-Type: application/json): {"text": "..."}.')
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            return self._error(411, "the request has no valid Content-Length.")
        if length > MAX_BODY_BYTES:
            return self._error(413, f"the request is {length:,} bytes; prompts are at most {MAX_BODY_BYTES:,}.")
        try:
            body = json.loads(self.rfile.read(length))
        except TimeoutError:
            self.close_connection = True
            return self._error(408, f"the request's {length:,} bytes did not arrive within {self.timeout} s.")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(400, f'the body is not JSON ({e}); send {{"text": "..."}}.')
        except RecursionError:  # the parser recurses once per level of nesting
            return self._error(400, 'the body is JSON nested too deeply to read; send {"text": "..."}.')
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return self._error(400, 'the body must be a JSON object with the prompt as a string: {"text": "..."}.')
        try:
            body["text"].encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's \ud800 escapes make lone surrogates, which no tokenizer takes
            return self._error(400, f"the text is not valid Unicode ({e.reason} at character {e.start}).")
        try:
            data = self.server.prompt_json(body["text"])
        except DataError as e:
            return self._error(400, str(e))
        self._send(200, "application/json", json.dumps(data, allow_nan=False))

    def _not_allowed(self) -> None:
        if self._host_allowed():
            self._error(405, "POST to /api/prompt with a JSON body {\"text\": \"...\"}; GET anything else.")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _host_allowed(self) -> bool:
        try:
            host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        except ValueError:  # such as an unclosed "[" of an IPv6 address
            self._error(400, "the request's Host header is not a host name or address.")
            return False
        if host in self.server.host_names or is_loopback_address(host):
            return True
        if self.server.loopback:
            self._error(403, f"this server answers only requests to http://127.0.0.1 or http://localhost, "
                             f"not to host {host!r}.")
            return False
        if is_ip_address(host):
            return True
        self._error(403, f"this server answers requests to this machine's addresses and to "
                         f"{', '.join(sorted(self.server.host_names))}, not to host {host!r}.")
        return False

    def _error(self, status: int, message: str) -> None:
        self._send(status, "application/json", json.dumps({"error": message}))

    def _send(self, status: int, content_type: str, text: str) -> None:
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not self.head_only:
            self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), terminal_text(fmt % args))  # the request line is the client's


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves to this machine's loopback."""
    try:
        return is_loopback_address(socket.gethostbyname(host))
    except OSError:
        return False


def is_loopback_address(text: str) -> bool:
    return is_ip_address(text) and ipaddress.ip_address(text).is_loopback


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def open_server(fs: FeatureStore, sae: str, site: Path, host: str = "127.0.0.1", port: int = 8000) -> PromptServer:
    """Load the run's model and SAE ``sae`` (its name, or the hook where it is the only SAE) and open the
    port (the site need not be written yet)."""
    encoder = PromptEncoder(fs.run, fs.resolve(sae))
    return PromptServer((host, port), Path(site), encoder, fs.token_display)


def serve(server: PromptServer) -> None:
    """Serve until Ctrl-C."""
    if not server.loopback:
        print(f"warning: listening on {server.server_address[0]}, not loopback: anyone who can reach this "
              "machine can read the site and run the model.", file=sys.stderr)
    print(f"serving on {server.url}; open {server.url}/prompt.html to type prompts (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()

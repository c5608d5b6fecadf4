"""Credentials in the URL forms that store.location once let through (a fragment, the keys it did not
know, ``;`` between pairs), URLs that its masking did not see (a space in the user info, ``datasets``'
``https:/`` with one slash, a warning's text), and the storage errors that ended in a traceback
instead of a line that says what to do. No network: hosts are ``.invalid``, and a socket that
connects fails the test."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from functools import partial

import pytest

from jobs.cli import main
from store import FeatureStore
from store.errors import ConfigError, StoreAccessError
from store.location import CREDENTIALS_FIX, access_error, credentials_in, mask_url, mask_urls, normalize

SECRET = "SEKRIT13"


def refusal(masked: str, found: str) -> str:
    return f"the store URL {masked} holds credentials ({found}). {CREDENTIALS_FIX}"


# -- 1. a fragment holds parameters as a query does ----------------------------------------------


def test_a_secret_in_a_fragment_is_refused_and_masked():
    url = f"https://h.invalid/x#access_token={SECRET}&token_type=bearer"
    with pytest.raises(ConfigError) as refused:
        normalize(url)
    assert str(refused.value) == refusal("https://h.invalid/x#access_token=***&token_type=***",
                                         "the fragment parameters access_token, token_type")
    assert credentials_in(f"https://h.invalid/x?sig={SECRET}#id_token={SECRET}") == (
        "the query parameter sig and the fragment parameter id_token")
    assert mask_urls(f"failed: https://h.invalid/x.zarr#access_token={SECRET} (404)") == (
        "failed: https://h.invalid/x.zarr#access_token=*** (404)")


def test_a_fragment_without_secrets_is_accepted():
    for url in ("https://h.invalid/x.zarr#section", "s3://bucket/x.zarr#part=2"):
        assert normalize(url) == url


def test_the_command_line_refuses_a_fragment_secret(capsys, no_network):
    assert main(["info", f"https://h.invalid/x#access_token={SECRET}"]) == 2
    out = capsys.readouterr()
    assert out.err == ("latentstore info: error: " + refusal("https://h.invalid/x#access_token=***",
                                                             "the fragment parameter access_token") + "\n")
    assert SECRET not in out.out + out.err


# -- 2. the secret keys that were missing; pairs split on ";" ------------------------------------


@pytest.mark.parametrize("key", ["jwt", "pass", "pw", "passwd", "code", "hdnts", "hdnea", "id_jwt", "user_pw",
                                 "adminPass", "PW", "auth-code", "bearer"])
def test_secret_query_keys(key):
    assert credentials_in(f"https://h.invalid/x.zarr?{key}={SECRET}") == f"the query parameter {key}"


def test_pairs_split_on_a_semicolon():
    url = f"https://h.invalid/x.zarr?a=1;token={SECRET}"
    assert credentials_in(url) == "the query parameter token"
    assert mask_url(url) == "https://h.invalid/x.zarr?a=***;token=***"


def test_an_encoded_separator_inside_a_value_shows_none_of_it():
    """Masking reads the URL decoded, where ``%26`` is an ``&``: what follows it is still the value."""
    url = f"https://h.invalid/x.zarr?token=ab%26{SECRET}%3B{SECRET}&v=1"
    assert mask_url(url) == "https://h.invalid/x.zarr?token=***&***;***&v=***"
    assert SECRET not in mask_urls(f"reading {url} failed")


def test_ordinary_query_keys_are_no_secrets():
    url = "https://h.invalid/x.zarr?version=3&format=zarr&encoding=utf-8&codec=blosc&compass=n&passage=2&region=eu"
    assert credentials_in(url) is None
    assert normalize(url) == url


# -- 3. a space or a tab in the user info ---------------------------------------------------------


@pytest.mark.parametrize("space", [" ", "\t"])
def test_user_info_holding_whitespace_is_masked(space):
    secret = f"SEK{space}RIT"
    assert mask_urls(f"cannot open https://u:{secret}@h.invalid/x.zarr: refused") == (
        "cannot open https://***@h.invalid/x.zarr: refused")
    assert mask_urls(f"reading simplecache::s3://AKIA:{secret}@bucket/x failed") == (
        "reading simplecache::s3://***@bucket/x failed")
    with pytest.raises(ConfigError) as refused:
        normalize(f"https://u:{secret}@h.invalid/x.zarr")
    assert str(refused.value) == refusal("https://***@h.invalid/x.zarr", "a user name and password")


def test_a_sentence_after_a_url_without_an_at_is_kept():
    for text in ("https://h.invalid:443/x.zarr failed: see the log, then rerun",
                 "s3://bucket/x.zarr: no such key. Check the path"):
        assert mask_urls(text) == text


# -- 4. a URL written with one slash, as datasets writes one it took for a path --------------------


def test_one_slash_urls_are_masked():
    assert mask_urls(f"FileNotFoundError: /cwd/https:/h.invalid/x?jwt={SECRET} not found") == (
        "FileNotFoundError: /cwd/https:/h.invalid/x?jwt=*** not found")
    assert mask_urls(f"/cwd/s3:/AKIA:{SECRET}@bucket/x") == "/cwd/s3:/***@bucket/x"
    assert mask_urls(f"/cwd/abfss:/c/x?sig={SECRET}") == "/cwd/abfss:/c/x?sig=***"
    assert mask_urls("D:/runs/x.zarr?a=1 is a Windows path") == "D:/runs/x.zarr?a=1 is a Windows path"


# -- 5. storage errors: a line that says what to do, the URL in it masked --------------------------


class ParamValidationError(Exception):  # named as botocore names it: matched by name, nothing imported
    pass


class HfUriError(ValueError):  # huggingface_hub's
    pass


def test_a_bucket_name_botocore_refuses():
    error = ParamValidationError('Parameter validation failed:\nInvalid bucket name "Bad!b": Bucket name must '
                                 'match the regex "^[a-z]+$"')
    assert str(access_error("s3://Bad!b/x", error)) == (
        "the store at s3://Bad!b/x cannot be opened: its bucket name is not valid. Correct it in the URL: S3 "
        "bucket names are 3 to 63 lowercase letters, digits, '.' and '-'. (ParamValidationError: Parameter "
        'validation failed: Invalid bucket name "Bad!b": Bucket name must match the regex "^[a-z]+$")')


def test_the_command_line_says_a_bucket_name_is_invalid(monkeypatch, capsys, no_network):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")  # credentials found without asking the network
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["info", "s3://Bad!b/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentstore info: error: the store at s3://Bad!b/x cannot be opened: its bucket name is "
                          "not valid. Correct it in the URL: S3 bucket names are 3 to 63 lowercase letters, digits, "
                          "'.' and '-'. (ParamValidationError: Parameter validation failed: Invalid bucket name "
                          '"Bad!b"'), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_protocol_whose_package_is_not_installed(monkeypatch, capsys, no_network):
    import importlib

    from fsspec.registry import known_implementations

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs fails, as where it is not installed
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "gs", raising=False)
    said = (f"the store at gs://b/x cannot be opened: the package for its protocol is not installed. Install it "
            f"(pip install gcsfs), then rerun. (ImportError: {known_implementations['gs']['err']})")
    with pytest.raises(StoreAccessError) as raised:
        FeatureStore.open("gs://b/x")
    assert str(raised.value) == said
    assert main(["info", "gs://b/x"]) == 2
    assert capsys.readouterr().err == f"latentstore info: error: {said}\n"


def test_a_missing_dependency_of_fsspecs_own_implementation():
    from fsspec.registry import known_implementations

    try:
        raise ImportError(known_implementations["sftp"]["err"]) from ModuleNotFoundError("no paramiko",
                                                                                         name="paramiko")
    except ImportError as error:
        assert str(access_error("sftp://h.invalid/x", error)) == (
            "the store at sftp://h.invalid/x cannot be opened: a package for its protocol is not installed. Install "
            f"the one that fsspec names, then rerun. (ImportError: {known_implementations['sftp']['err']})")
    assert access_error("gs://b/x", ImportError("No module named 'torch'")) is None  # a bug, not the URL


def test_a_hugging_face_url_without_a_repository():
    error = HfUriError(f"Invalid HF URI 'hf://datasets/bad/.zgroup?token={SECRET}'.")
    assert str(access_error("hf://datasets/bad", error)) == (
        "the store at hf://datasets/bad cannot be opened: the URL names no Hugging Face repository. Give one as "
        "hf://datasets/OWNER/NAME/PATH for a dataset repository, or hf://OWNER/NAME/PATH for a model's. "
        "(HfUriError: Invalid HF URI 'hf://datasets/bad/.zgroup?token=***'.)")


def test_the_command_line_says_a_hugging_face_url_names_no_repository(monkeypatch, capsys, no_network):
    import huggingface_hub.errors
    from huggingface_hub import HfFileSystem

    def no_repository(self, path, *args, **kwargs):  # as huggingface_hub says it, without asking the hub
        raise huggingface_hub.errors.HfUriError(f"hf://{path}", "Unable to infer repository_id.")

    monkeypatch.setattr(HfFileSystem, "resolve_path", no_repository)
    assert main(["info", "hf://datasets/bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentstore info: error: the store at hf://datasets/bad cannot be opened: the URL names "
                          "no Hugging Face repository. Give one as hf://datasets/OWNER/NAME/PATH for a dataset "
                          "repository, or hf://OWNER/NAME/PATH for a model's. (HfUriError: "), err
    assert "damaged" not in err and "Traceback" not in err


def test_httpcore_connect_error_is_unreachable():
    import httpcore

    error = httpcore.ConnectError(f"[Errno 111] Connection refused: https://u:SEK RIT@h.invalid/x?v={SECRET}")
    assert str(access_error("https://h.invalid/x.zarr", error)) == (
        "the store at https://h.invalid/x.zarr cannot be opened: it could not be reached. Check the network, the "
        "host name in the URL and any proxy, then rerun. (ConnectError: [Errno 111] Connection refused: "
        "https://***@h.invalid/x?v=***)")


def test_an_unknown_protocol_is_said_so(capsys, no_network):
    with pytest.raises(ConfigError) as refused:
        normalize(f"nosuchproto://h/x?v={SECRET}")
    said = str(refused.value)
    assert said.startswith("the store URL nosuchproto://h/x?v=*** names a protocol that fsspec does not know: "
                           "'nosuchproto'. Give one it knows (abfs, "), said
    assert said.endswith("), or install the package that provides 'nosuchproto'."), said
    with pytest.raises(ConfigError, match=r"^the store URL simplecahce::s3://b/x names a protocol that fsspec does "
                                          r"not know: 'simplecahce'\. Give one it knows \(simplecache, "):
        normalize("simplecahce::s3://b/x")
    assert main(["info", "nosuchproto://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentstore info: error: the store URL nosuchproto://x names a protocol that fsspec does "
                          "not know: 'nosuchproto'."), err
    assert "damaged" not in err


def test_protocols_fsspec_knows_are_accepted(monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "latentstoretest", {"class": "x.X"})  # as an entry point adds one
    for url in ("latentstoretest://b/x", "simplecache::memory://x", "filecache::simplecache::s3://b/x"):
        assert normalize(url) == url


# -- 6. a warning quoting the store URL reaches the terminal masked -----------------------------


class AnyPathIsTheFile(http.server.SimpleHTTPRequestHandler):
    """Serves ``f.zarr`` for every path under it: zarr finds both zarr.json and .zgroup and warns,
    quoting the store's URL."""

    def log_message(self, *args):
        pass


def test_a_warning_shows_the_url_masked(tmp_path):
    (tmp_path / "f.zarr").write_text("{}")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(AnyPathIsTheFile, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/f.zarr?v={SECRET}"
    try:
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "info", url], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2, done.stderr
    assert ("ZarrUserWarning: Both zarr.json (Zarr format 3) and .zgroup (Zarr format 2) metadata objects exist at "
            f"<FsspecStore(HTTPFileSystem, http://127.0.0.1:{server.server_port}/f.zarr?v=***") in done.stderr, \
        done.stderr
    assert SECRET not in done.stdout + done.stderr

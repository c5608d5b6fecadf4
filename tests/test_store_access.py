"""A store that cannot be reached (no connection, no credentials, access denied) gets an error that
says which and the fix, from the library and from every command, never a traceback of the storage
SDK's, nor "no store here" for a store that may well be there."""

from __future__ import annotations

import socket

import pytest

from jobs.cli import main
from store import FeatureStore
from store.errors import StoreAccessError, StoreWriteError
from store.location import access_error
from store.verify import verify_store

HOOK = "blocks.0.hook_resid_post"


class NoCredentialsError(Exception):  # named as botocore names it: matched by name, nothing imported
    pass


class ClientResponseError(Exception):  # aiohttp's, with the HTTP status
    def __init__(self, status: int):
        super().__init__(f"{status}, message='Forbidden', url='https://user:hunter2@host/x.zarr/zarr.json'")
        self.status = status


@pytest.mark.parametrize(("error", "said"), [
    (NoCredentialsError("Unable to locate credentials"), "no credentials for it were found. Give them in environment "
                                                         "variables (AWS_ACCESS_KEY_ID"),
    (PermissionError(13, "Access Denied"), "access was denied. Use credentials that may read and write it"),
    (ClientResponseError(403), "access was denied"),
    (ConnectionRefusedError(111, "Connection refused"), "it could not be reached. Check the network"),
    (TimeoutError("timed out"), "it could not be reached"),
])
def test_access_errors_say_which_and_the_fix(error, said):
    found = access_error("s3://bucket/x.zarr", error)
    assert isinstance(found, StoreAccessError)
    assert str(found).startswith(f"the store at s3://bucket/x.zarr cannot be opened: {said}"), str(found)
    assert f"({type(error).__name__}: " in str(found) and "hunter2" not in str(found)
    try:  # found behind an error raised from it, as zarr and Ray wrap what the storage SDK raised
        raise RuntimeError("reading zarr.json failed") from error
    except RuntimeError as wrapped:
        assert str(access_error("s3://bucket/x.zarr", wrapped)) == str(found)


def test_other_errors_are_not_access_errors():
    assert access_error("s3://bucket/x.zarr", ValueError("bad JSON")) is None
    assert access_error("s3://bucket/x.zarr", FileNotFoundError("no such key")) is None  # "no store here" says that
    # latentstore's own errors already say what and how to fix it (StoreWriteError is a PermissionError)
    assert access_error("/data/x.zarr", StoreWriteError("--store /data/x.zarr: cannot write in /data")) is None
    assert str(access_error("/data/x.zarr", PermissionError(13, "Permission denied"))).startswith(
        "the store at /data/x.zarr cannot be opened: access was denied. Change its permissions, or run as a user")
    assert "cannot be opened: no credentials" in str(access_error(None, NoCredentialsError("x")))
    assert "public bucket, read anonymously: FSSPEC_S3_ANON=true" in str(access_error(None, NoCredentialsError("x")))


@pytest.fixture
def unreachable() -> str:
    """An https store on a local port that nothing listens on: refused at once, with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}/x.zarr"


def test_the_library_says_a_store_cannot_be_reached(unreachable):
    for open_it in (FeatureStore.open, verify_store):
        with pytest.raises(StoreAccessError, match=rf"the store at {unreachable} cannot be opened: it could not be "
                                                   r"reached\. .*\(ClientConnectorError: Cannot connect to host"):
            open_it(unreachable)


COMMANDS = [("info", "{url}"), ("top", "{url}", "--hook", HOOK, "--feature", "1"), ("verify", "{url}"),
            ("index", "{url}"), ("export", "neuronpedia", "{url}", "--out", "{tmp}/np"),
            ("export", "delphi", "{url}", "--out", "{tmp}/delphi"), ("dashboard", "{url}", "--out", "{tmp}/site"),
            ("sweep", "--name", "s", "--store", "{url}", "--rows", "0:4", "--metric", "kl"),
            ("extract", "--model", "{model}", "--sae", "{sae}", "--dataset", "{jsonl}", "--store", "{url}",
             "--context-size", "16", "--workers", "1", "--no-progress")]


def test_every_command_says_the_store_cannot_be_reached(assets, unreachable, tmp_path, capsys):
    for command in COMMANDS:
        argv = [a.format(url=unreachable, tmp=tmp_path, model=assets["model_dir"], sae=assets["sae_dirs"][HOOK],
                         jsonl=assets["jsonl"]) for a in command]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        name = " ".join(argv[:2]) if argv[0] == "export" else argv[0]
        assert err.startswith(f"latentstore {name}: error: the store at {unreachable} cannot be opened: it could "
                              "not be reached. Check the network"), (argv, err)
        assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing made before the store was reached


def test_a_bucket_without_credentials(monkeypatch, capsys):
    """botocore finds no credentials (none in the environment or config files, no instance metadata):
    the command says so, and how to give them or to read a public bucket anonymously."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a file system an earlier test made has its credentials settled
    assert main(["info", "s3://latentstore-test-no-such-bucket/x.zarr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentstore info: error: the store at s3://latentstore-test-no-such-bucket/x.zarr cannot "
                          "be opened: no credentials for it were found."), err
    assert "FSSPEC_S3_ANON=true" in err and "(NoCredentialsError: Unable to locate credentials)" in err
    assert "Traceback" not in err

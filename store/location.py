"""Where a store lives: a local path or any fsspec URL (``s3://``, ``gs://``, ...).

Credentials come from the environment or the usual config files, through
fsspec; they are never passed in here, so they cannot reach store metadata.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, unquote_plus

import fsspec
import zarr
from fsspec.registry import known_implementations
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore

from store.errors import ConfigError, LatentStoreError, StoreAccessError, StoreWriteError, did_you_mean


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """A canonical string for a store location (absolute for local paths)."""
    location = os.fspath(location)
    if "://" in location:
        _refuse_credentials(location)  # first: nothing may read, log or print the URL before this
        _refuse_unknown_protocols(location)
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    if is_url(location):
        return location
    return str(Path(location).expanduser().resolve())


def _refuse_unknown_protocols(url: str) -> None:
    """fsspec would say no more than "Protocol not known" when the store is first read, which readers
    take for unreadable metadata: a typo (``s3:`` as ``sss:``) is said here, with the protocols it knows."""
    known = {*known_implementations, *fsspec.registry}  # what fsspec.get_filesystem_class looks in
    links = url.split("::")
    # fsspec's reading of a chain: ``proto://path``, and a bare lowercase word is a protocol (``simplecache::``)
    protocols = [link.partition("://")[0] if "://" in link else link for link in links
                 if "://" in link or (len(links) > 1 and re.fullmatch("[a-z]+", link))]
    for protocol in protocols:
        if len(protocol) > 1 and protocol not in known:  # one letter: a Windows drive, as fsspec takes it
            raise ConfigError(f"the store URL {mask_url(url)} names a protocol that fsspec does not know: "
                              f"{protocol!r}. Give one it knows ({did_you_mean(protocol, sorted(known))}), or "
                              f"install the package that provides {protocol!r}.")


# Credentials in store URLs. Every link of an fsspec chain (``simplecache::s3://...``) is checked,
# whatever its protocol (fsspec knows dozens: ``fsspec.registry.known_implementations``).
# Protocols whose URLs name a user as part of the address (``abfs://container@account``,
# ``sftp://user@host``): a user name alone is allowed there, a password never.
USER_IS_ADDRESS = frozenset({"abfs", "abfss", "az", "adl", "oci", "ocilake", "ftp", "sftp", "ssh", "smb",
                             "hdfs", "webhdfs", "arrow_hdfs", "root", "dbfs"})
# Protocols with ``host:port`` addresses, where a number after the host is a port, not a password.
HOST_PORT = frozenset({"http", "https", "ftp", "sftp", "ssh", "smb", "webdav", "webhdfs", "hdfs", "arrow_hdfs",
                       "root", "jupyter", "jlab", "dask", "lakefs", "dbfs"})
# Protocols whose ``a:b@c`` is no user and password: ``github://org:repo@sha/path``, ``git://repo:ref@path``.
NOT_USERINFO = frozenset({"github", "git"})
# Protocols whose URLs start with a bucket (or container) name, which never holds a ``:``: one there is
# a ``KEY:SECRET`` whose ``@`` was left out, and the storage SDK's "invalid bucket name" would show it.
BUCKET_FIRST = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "tos", "tosfs", "oci",
                          "ocilake"})
# Query (and fragment) keys that carry secrets: signed URLs (X-Amz-*, X-Goog-*, Azure SAS ``sig``, Akamai
# ``hdnts``/``hdnea``), tokens (JWTs, bearer, OAuth's ``#access_token``), keys, passwords. Found anywhere in a key;
SECRET_QUERY_KEY = re.compile(r"key|secret|token|passw|pwd|sig|credential|auth|session|jwt|bearer|hdnts|hdnea|"
                              r"^x-amz-|^x-goog-", re.IGNORECASE)
# and these as whole words of a key (``pass``, ``user_pw``, ``adminPass``; OAuth's ``code``), which inside other
# words are none (``compass``, ``encoding``).
SECRET_QUERY_WORDS = frozenset({"pass", "pw", "code", "otp"})
CREDENTIALS_HOW = ("environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, "
                   "...) or the provider's config files")
CREDENTIALS_FIX = f"Remove them from the URL and give them the usual way instead: {CREDENTIALS_HOW}."


def _refuse_credentials(url: str) -> None:
    """A URL with credentials in it would carry them into messages, logs and the storage SDK's errors:
    refuse it, before anything reads it, without repeating them. Every link of a ``::`` chain is checked:
    its user info (``user:secret@``, also when the secret holds a ``/`` that ends the URL's host early)
    and its query (``?X-Amz-Signature=...``, ``?sig=...``, ``?token=...``)."""
    found = credentials_in(url)
    if found:
        raise ConfigError(f"the store URL {mask_url(url)} holds credentials ({found}). {CREDENTIALS_FIX}")


def credentials_in(url: str) -> str | None:
    """What credentials any link of ``url`` holds, said without repeating them (``None``: none)."""
    found = [problem for link in url.split("::") if (problem := _link_credentials(link))]
    return "; ".join(found) or None


def _link_credentials(link: str) -> str | None:
    """What credentials one link of a chain holds (``None``: none). Percent-escapes are decoded first,
    so that ``KEY%3ASECRET%40bucket`` is seen for what a client may make of it."""
    link = unquote(link)
    protocol, sep, rest = link.partition("://")
    if not sep:
        return None  # a plain path (``simplecache::/data/x``)
    protocol = protocol.lower()
    userinfo = _userinfo(protocol, rest)
    if userinfo is not None and (":" in userinfo or protocol not in USER_IS_ADDRESS):
        return "a user name and password" if ":" in userinfo else "a user name or access key"
    if protocol in BUCKET_FIRST and ":" in _authority(rest):
        return "a ':' in the bucket name, as in KEY:SECRET"
    rest, _, fragment = rest.partition("#")  # a fragment holds parameters too: OAuth's #access_token=...
    found = [f"the {part} parameter{'s' if len(keys) > 1 else ''} {', '.join(keys)}"
             for part, text in (("query", rest.partition("?")[2]), ("fragment", fragment))
             if (keys := _secret_keys(text))]
    return " and ".join(found) or None


def _secret_keys(parameters: str) -> list[str]:
    """The keys of ``parameters`` (``a=1&b=2``, or ``a=1;b=2``, which ``parse_qsl`` takes for one
    value) that carry secrets, decoded as servers decode them, sorted."""
    keys = {unquote_plus(pair.partition("=")[0]) for pair in re.split("[&;]", parameters)}
    return sorted(key for key in keys if SECRET_QUERY_KEY.search(key) or SECRET_QUERY_WORDS & {
        word.lower() for word in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", key)})  # snake, kebab, camelCase


def _userinfo(protocol: str, rest: str) -> str | None:
    """The ``user[:secret]`` before the address, if any. A secret may hold ``/``, ``?`` or ``#``, which
    end a URL's host for ``urlsplit``: so the text up to the last ``@`` counts as user info when a ``:``
    comes before any ``/`` in it, unless that ``:`` starts a port (``http://host:8080/a@b``)."""
    if protocol in NOT_USERINFO or "@" not in rest:
        return None
    authority = _authority(rest)
    if "@" in authority:
        return authority.rsplit("@", 1)[0]
    head, colon, tail = rest.rsplit("@", 1)[0].partition(":")
    if not colon or "/" in head:
        return None  # an "@" in the path: s3://bucket/model@v2.zarr
    if protocol in HOST_PORT and re.fullmatch(r"\d+", re.split(r"[/?#]", tail, maxsplit=1)[0]):
        return None  # host:port, then an "@" in the path
    return f"{head}:{tail}"


def _authority(rest: str) -> str:
    """What comes before the path, the query or the fragment."""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


# A URL in a message: ``scheme://`` and what follows up to a space or a quote, but a user info that holds
# a space (``https://u:SEK RET@host``) up to its ``@``, which must come before any ``/``, ``?`` or ``#``
# (so that a sentence after a URL is not taken for one); and a known scheme with one slash, as
# ``datasets`` writes a URL it took for a relative path (``/cwd/https:/host/x?jwt=...``).
KNOWN_SCHEMES = frozenset({*known_implementations, *USER_IS_ADDRESS, *HOST_PORT, *NOT_USERINFO, *BUCKET_FIRST})
URL_IN_TEXT = re.compile(r"""(?:[A-Za-z][\w+.-]*://|(?P<one_slash>(?:%s):/))"""
                         r"""(?:(?<=://)[^\s/?#@'"]*:[^\r\n/?#@'"]*@|[^\s'"])+"""
                         % "|".join(map(re.escape, sorted(KNOWN_SCHEMES))))


def mask_urls(text: str) -> str:
    """``text`` (a message quoting what a user typed) with every URL in it masked by ``mask_url``."""
    def masked(m: re.Match) -> str:
        if m["one_slash"]:
            return mask_url(m.group().replace(":/", "://", 1)).replace("://", ":/", 1)
        return mask_url(m.group())

    return URL_IN_TEXT.sub(masked, text)


def mask_url(url: str) -> str:
    """``url`` with every link's user info and every query or fragment value replaced by ``***``: safe to show."""
    masked = []
    for link in url.split("::"):
        protocol, sep, rest = unquote(link).partition("://")
        if sep and _userinfo(protocol.lower(), rest) is not None:
            rest = "***@" + rest.rsplit("@", 1)[1]
        elif sep and protocol.lower() in BUCKET_FIRST and ":" in _authority(rest):
            rest = "***" + rest[len(_authority(rest)):]
        if sep and (start := re.search("[?#]", rest)):
            # every value, to the next pair: a value may hold a "#" or "?" that is part of the secret; and
            # a piece without "=" is the rest of a value whose "%26" or "%3B" the decoding above made a separator
            rest = rest[:start.end()] + re.sub("[^&;]+", lambda m: m.group().split("=")[0] + "=***" if "=" in m.group()
                                               else "***", rest[start.end():])
        masked.append(f"{protocol}{sep}{rest}")
    return "::".join(masked)


# Failures to reach a store, by the names of the exception classes that the storage SDKs under fsspec
# raise (botocore, aiohttp, google-auth, azure-identity): matched by name, so that none is imported.
NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                            "DefaultCredentialsError", "RefreshError", "CredentialUnavailableError",
                            "ClientAuthenticationError"})
UNREACHABLE = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectionError",
                         "ServerTimeoutError", "TransportError", "ServiceRequestError", "ConnectError"})
ANONYMOUS_READS = ("for a public bucket, read anonymously: FSSPEC_S3_ANON=true (S3), FSSPEC_GCS_TOKEN=anon "
                   "(Google Cloud Storage)")


def access_error(location: str | None, error: BaseException) -> StoreAccessError | None:
    """The StoreAccessError that says why the store at ``location`` could not be reached, for an
    ``error`` (or one it was raised from) that means no connection, no credentials or access denied,
    or a URL that its storage cannot take (a bucket name botocore refuses, a Hugging Face URL that
    names no repository, a protocol whose package is not installed); None for any other error. It
    quotes the error's own text on one line, its URLs masked. Without a ``location`` it speaks of what
    was being read or written, which that text names."""
    for cause in _chain(error):
        if isinstance(cause, LatentStoreError):
            return None  # already says what went wrong, and how to fix it
        names = {cls.__name__ for cls in type(cause).__mro__}
        status = getattr(cause, "status", None)
        if names & NO_CREDENTIALS:
            fix = f"no credentials for it were found. Give them in {CREDENTIALS_HOW}; {ANONYMOUS_READS}."
        elif isinstance(cause, PermissionError) or status in (401, 403):
            fix = ("access was denied. Change its permissions, or run as a user who may read and write it."
                   if location and not is_url(location) else
                   "access was denied. Use credentials that may read and write it, or change its permissions.")
        elif names & UNREACHABLE or isinstance(cause, (ConnectionError, TimeoutError)):
            fix = "it could not be reached. Check the network, the host name in the URL and any proxy, then rerun."
        elif "ParamValidationError" in names:  # botocore's, before any request is sent
            fix = ("its bucket name is not valid. Correct it in the URL: S3 bucket names are 3 to 63 lowercase "
                   "letters, digits, '.' and '-'." if "Invalid bucket name" in str(cause) else
                   "the storage SDK refuses a parameter made from the URL. Correct its bucket and object names.")
        elif "HfUriError" in names:
            fix = ("the URL names no Hugging Face repository. Give one as hf://datasets/OWNER/NAME/PATH for a "
                   "dataset repository, or hf://OWNER/NAME/PATH for a model's.")
        elif isinstance(cause, ImportError) and (package := _backend_package(cause)) is not None:
            fix = (f"the package for its protocol is not installed. Install it (pip install {package}), then rerun."
                   if package else "a package for its protocol is not installed. Install the one that fsspec names, "
                                   "then rerun.")
        else:
            continue
        where = f"the store at {mask_url(location)}" if location else "what this reads or writes"
        said = " ".join(mask_urls(str(cause)).split())[:300] or "no message"  # masked before it is cut or joined
        return StoreAccessError(f"{where} cannot be opened: {fix} ({type(cause).__name__}: {said})")
    return None


def _backend_package(error: ImportError) -> str | None:
    """For fsspec's ImportError for a protocol whose package is not installed (its message is the one
    ``known_implementations`` holds for that protocol), the package to install: the missing module when
    it is the one that implements the protocol (``gcsfs``), else "" (a dependency of fsspec's own
    implementation, which its message names: ``paramiko``). None for any other ImportError."""
    classes = [impl["class"] for impl in known_implementations.values() if impl.get("err") == str(error)]
    if not classes:
        return None
    package = (getattr(error.__cause__, "name", None) or "").split(".")[0]
    return package if package and any(cls.split(".")[0] == package for cls in classes) else ""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it was raised from (a Ray task's error carries its ``cause``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or getattr(error, "cause", None)


@contextmanager
def reaching(location: str) -> Iterator[None]:
    """Raises a StoreAccessError (``access_error``) for a failure to reach the store at ``location``."""
    try:
        yield
    except Exception as e:
        problem = access_error(location, e)
        if problem is None:
            raise
        raise problem from e


def open_zarr_store(location: str, read_only: bool = False) -> zarr.abc.store.Store:
    location = normalize(location)
    if is_url(location):
        return FsspecStore.from_url(location, read_only=read_only)
    return LocalStore(location, read_only=read_only)


def open_root(location: str, mode: str = "r") -> zarr.Group:
    """The store's root group; a store that cannot be reached raises StoreAccessError."""
    with reaching(location):
        return zarr.open_group(open_zarr_store(location, read_only=(mode == "r")), mode=mode)


class RootHandle:
    """A store's root, opened for writing at first use and kept: the one handle a writer (of a
    store, of a sweep) works through, instead of opening the store again for every step."""

    def __init__(self, location: str):
        self.location = normalize(location)
        self._root: zarr.Group | None = None

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            self._root = open_root(self.location, mode="a")
        return self._root


def has_content(location: str) -> bool:
    """Whether anything at all lives at ``location``."""
    location = normalize(location)
    if is_url(location):
        import fsspec

        with reaching(location):
            fs, path = fsspec.core.url_to_fs(location)
            return fs.exists(path) and bool(fs.ls(path))
    path = Path(location)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_writable(location: str) -> None:
    """Fail now, not after the model ran, when the store cannot be written."""
    location = normalize(location)
    if is_url(location):
        return  # object stores say so on the first write; there is no cheap probe
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise StoreWriteError(f"--store {location} is a file, not a store directory. Choose another path.")
    ancestor = path if path.is_dir() else path.parent  # a store folder that exists is written in itself
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StoreWriteError(f"--store {location} cannot be created: {ancestor} is a file. Choose another path.")
    if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
        raise StoreWriteError(
            f"--store {location}: {ancestor} is on a read-only file system. Choose a path on a writable disk, "
            "or mount it read-write."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StoreWriteError(
            f"--store {location}: cannot write in {ancestor} (permission denied). "
            "Choose a path you can write, or fix its permissions."
        )
    if os.path.ismount(path) and not (path / "zarr.json").exists():
        raise StoreWriteError(
            f"--store {location} is a mount point. A new store replaces its folder, which a mount point does not "
            f"allow: give a folder inside it, such as --store {path / 'latentstore.zarr'}."
        )


def subgroup_names(group: zarr.Group) -> list[str]:
    """The names of a group's subgroups, sorted.

    Readers may list while writers write, and zarr warns of every object that is not yet part of the
    hierarchy: its local store's temporary ``<name>.<uuid>.partial`` files, and a group's folder
    before its ``zarr.json`` is written (a shard being created or redone). Both are so, and no
    concern of the reader's: what is not a group is not listed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component",
                                category=ZarrUserWarning)
        return sorted(group.group_keys())

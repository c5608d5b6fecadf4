"""The writer lease: one writing command at a time per store (spec: docs/FORMAT.md, "The writer lease").

A command that writes a store (`latentstore extract`, `latentstore index`, `latentstore sweep`)
takes the store's lease before it writes anything and gives it back when it ends, on error too.
The lease is a small JSON object *beside* the store, ``<store>.lease.json``, so no zarr reader,
``verify`` or ``--overwrite`` ever meets it. It names its holder (host, pid, command, since when)
and carries a heartbeat that the holder renews from a background thread every ``ttl_s / 3``.

A second writer finds the lease and is refused with a ``StoreLockedError`` naming the holder. A
lease whose holder died is *stale*, and the next writer takes it over: on the holder's own
machine as soon as its process is gone, from anywhere once its heartbeat is older than its TTL.

Every change is a compare-and-swap, so of several writers racing exactly one wins:

- local paths: a new lease is linked into place (``os.link`` fails if the name exists); a stale
  one is first renamed aside, which only one taker can do, then checked to be the lease judged
  stale (else it is put back);
- S3 (s3fs): conditional writes, ``If-None-Match: *`` to create, ``If-Match: <etag>`` to take
  over, renew and delete;
- other fsspec stores: write, then read back after ``settle_s``: the last writer wins and the
  others see it.

Each acquisition is read back before it counts. Workers never take the lease: they write their
own parts under their driver's. Needs the standard library only (and fsspec for URLs).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from store import format as fmt
from store.errors import ConfigError, StoreLockedError, StoreWriteError
from store.location import check_writable, is_url, normalize, reaching

log = logging.getLogger(__name__)

LEASE_ENCODING = "latentstore.lease"
LEASE_SUFFIX = ".lease.json"  # the lease of the store at PATH is PATH.lease.json
DEFAULT_TTL_S = 60.0  # a heartbeat older than this makes the lease stale
TTL_ENV = "LATENTSTORE_LEASE_TTL_S"  # overrides DEFAULT_TTL_S for the leases this process takes
ACQUIRE_ATTEMPTS = 5  # races lost in a row before giving up (each lost race re-reads the lease)


def lease_path(location: str) -> str:
    """Where the lease of the store at ``location`` lives: beside it, ``<store>.lease.json``."""
    location = normalize(location).rstrip("/")
    if is_url(location) and "/" not in location.split("://", 1)[1]:
        raise ConfigError(
            f"--store {location} is the root of a bucket. latentstore keeps a store's writer lease beside "
            f"the store, so give the store a name inside the bucket, e.g. {location}/run.zarr."
        )
    return location + LEASE_SUFFIX


def read_lease(location: str) -> dict | None:
    """The lease of the store at ``location`` (its holder and heartbeat), or None when no run holds it."""
    found = _backend(lease_path(location)).read()
    return None if found is None else _parse(found[0])


class StoreLease:
    """The writer lease of one store, held by this process. Use ``hold_lease`` rather than this."""

    def __init__(self, location: str, command: str, ttl_s: float | None = None):
        self.location = normalize(location)
        self.path = lease_path(self.location)
        self.command = command
        self.ttl_s = float(ttl_s or os.environ.get(TTL_ENV) or DEFAULT_TTL_S)
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # why, once another run took the lease from this one
        self._object = _backend(self.path)
        self._record: dict | None = None
        self._version: str | None = None  # of the lease object as last written by this holder
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back -------------------------------------------------------------------

    def acquire(self) -> StoreLease:
        """Take the lease, or raise ``StoreLockedError`` naming the run that holds it (and
        ``StoreAccessError`` where the store cannot be reached)."""
        if not is_url(self.location):
            check_writable(self.location)  # a clear message, rather than the lease file's OSError
        with reaching(self.location):
            return self._acquire()

    def _acquire(self) -> StoreLease:
        started = _now()
        record = {**fmt.encoding(LEASE_ENCODING), "token": self.token, "command": self.command, **_machine(),
                  "pid": os.getpid(), "started_at": _iso(started), "renewed_at": _iso(started), "ttl_s": self.ttl_s}
        data = _encode(record)
        for _ in range(ACQUIRE_ATTEMPTS):
            found = self._object.read()
            if found is None:
                version = self._object.create(data)
            else:
                holder, stale = self._judge(*found)
                if stale is None:
                    raise StoreLockedError(self._held_message(holder))
                log.warning("%s: taking over the writer lease of %s: %s.", self.location, _who(holder), stale)
                version = self._object.replace(data, found[1])
            if version is not None and self._owns():
                self._record = record
                self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.location}", daemon=True)
                self._thread.start()
                return self
            # another writer won this round: look again (it holds a fresh lease now, which refuses us)
        found = self._object.read()
        raise StoreLockedError(self._held_message(_parse(found[0]) if found else None))

    def release(self) -> None:
        """Give the lease back (stop renewing it, delete it if it is still this run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._version is not None and self.lost is None:
                try:
                    if not self._object.delete(self._version):
                        log.warning("%s: the writer lease was no longer this run's when it ended.", self.location)
                except OSError as e:  # the run's work is done; a lease left behind goes stale by itself
                    log.warning("%s: could not delete the writer lease %s (%s); it expires by itself %.0f s "
                                "after its last heartbeat.", self.location, self.path, e, self.ttl_s)
            self._version = None

    def check(self) -> None:
        """Raise if another run took this run's lease (it failed to renew it for ``ttl_s``)."""
        if self.lost is not None:
            raise StoreLockedError(self.lost)

    # -- renewing -----------------------------------------------------------------------------------

    def renew(self) -> None:
        """Write a fresh heartbeat; raise ``StoreLockedError`` if the lease is no longer this run's."""
        with self._lock:
            if self._version is None:
                return
            record = {**self._record, "renewed_at": _iso(_now())}
            version = self._object.renew(_encode(record), self._version)
            if version is None:
                found = self._object.read()
                holder = _parse(found[0]) if found else None
                self.lost = (
                    f"`{self.command}` lost its writer lease on {self.location}: it did not renew it for "
                    f"{self.ttl_s:.0f} s, and {'no run' if holder is None else _who(holder)} holds it now. "
                    "It stopped so as not to write beside another run. Rerun the same command once no other "
                    "run is writing the store: it resumes."
                )
                self._version = None
                raise StoreLockedError(self.lost)
            self._record, self._version = record, version

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except StoreLockedError as e:
                log.error("%s", e)
                return
            except Exception as e:  # a network blip: the lease stays valid until its TTL, try again
                log.warning("%s: could not renew the writer lease (%s: %s); retrying in %.0f s.",
                            self.location, type(e).__name__, e, self.ttl_s / 3)

    # -- judging the lease found --------------------------------------------------------------------

    def _owns(self) -> bool:
        """Read the lease back (after ``settle_s``, for stores without conditional writes)."""
        time.sleep(self._object.settle_s)
        found = self._object.read()
        if found is None or (_parse(found[0]) or {}).get("token") != self.token:
            return False
        self._version = found[1]
        return True

    def _judge(self, data: bytes, version: str) -> tuple[dict | None, str | None]:
        """The holder, and why its lease is stale (None: it is live)."""
        holder = _parse(data)
        if holder is None:  # being written by a store without atomic create, or damaged: wait and look again
            time.sleep(max(1.0, self._object.settle_s))
            again = self._object.read()
            if again is not None and again[1] == version:
                return None, "the lease is not readable JSON and did not change"
            return self._judge(*again) if again is not None else (None, "it was deleted")
        if _same_machine(holder) and not _pid_running(int(holder.get("pid", -1))):
            return holder, f"its process {holder.get('pid')} is no longer running on this machine"
        age = _now() - _time(holder.get("renewed_at"))
        ttl = float(holder.get("ttl_s", DEFAULT_TTL_S))
        if age > ttl:
            return holder, f"its last heartbeat was {age:.0f} s ago (it expires after {ttl:.0f} s)"
        return holder, None

    def _held_message(self, holder: dict | None) -> str:
        if holder is None:
            return (f"store {self.location} is being taken by another run right now (its writer lease {self.path} "
                    "changed several times while this run tried to take it). Wait for it, then run this command again.")
        age = max(0.0, _now() - _time(holder.get("renewed_at")))
        ttl = float(holder.get("ttl_s", DEFAULT_TTL_S))
        if _same_machine(holder):
            dead = (f"If that run is stuck, stop it (kill {holder.get('pid')}); once its process is gone, this "
                    "command takes the store over.")
        else:
            expiry = _time(holder.get("renewed_at")) + ttl
            dead = (f"If that run is dead, its lease expires {ttl:.0f} s after its last heartbeat, at "
                    f"{_iso(expiry, 'seconds')} (in {max(0.0, expiry - _now()):.0f} s); run this command again "
                    "then and it takes the store over.")
        return (
            f"store {self.location} is in use by another run: `{holder.get('command')}` ({_who(holder)}) has held "
            f"it since {holder.get('started_at')} (last heartbeat {age:.0f} s ago). Two runs writing one store "
            "would corrupt it, so this one stopped before writing anything. Wait for that run to end, then run "
            f"this command again. {dead} (The lease is {self.path}: do not delete it while that run is alive.)"
        )


# -- holding a lease across a command ---------------------------------------------------------------

_held: dict[tuple[str, int], list] = {}  # (lease path, thread) -> [lease, depth]


@contextmanager
def hold_lease(location: str, command: str, ttl_s: float | None = None):
    """Hold the writer lease of the store at ``location`` for the ``with`` block; re-entrant in one
    thread, so `latentstore extract` keeps its lease across the index it builds at the end."""
    key = (lease_path(location), threading.get_ident())
    if key in _held:
        _held[key][1] += 1
        try:
            yield _held[key][0]
        finally:
            _held[key][1] -= 1
        return
    lease = StoreLease(location, command, ttl_s).acquire()
    _held[key] = [lease, 1]
    try:
        yield lease
    finally:
        del _held[key]
        lease.release()


# -- the lease object, on each kind of storage ------------------------------------------------------
# read() -> (bytes, version) or None; create / replace / renew -> the new version, or None when the
# lease was not as expected (someone else's now); delete -> whether it was deleted.


class _LocalObject:
    settle_s = 0.0

    def __init__(self, path: str):
        self.path = path
        self.made_dirs: list[str] = []  # the store's missing parents, made for the lease: removed with it if empty

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, data: bytes) -> str | None:
        missing = Path(self.path).parent
        while not missing.exists():
            self.made_dirs.append(str(missing))
            missing = missing.parent
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self._write_temporary(data)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            store = self.path.removesuffix(LEASE_SUFFIX)
            raise StoreWriteError(
                f"--store {store}: cannot write its writer lease {self.path} ({e.strerror}). latentstore keeps a "
                f"store's lease beside the store, so the folder that holds it, {os.path.dirname(self.path)}, must "
                "be writable too. Choose a store inside a folder you can write."
            ) from None
        try:
            os.link(tmp, self.path)  # atomic, and fails if the name exists
        except FileExistsError:
            return None
        except OSError:  # a filesystem without hard links: exclusive create (readers may see it half-written)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        return _digest(data)

    def replace(self, data: bytes, version: str) -> str | None:
        aside = self._set_aside(version)
        if aside is None:
            return None
        try:
            return self.create(data)  # a writer that came in between (seeing no lease) wins instead
        finally:
            os.unlink(aside)

    def renew(self, data: bytes, version: str) -> str | None:
        found = self.read()
        if found is None or found[1] != version:
            return None
        os.replace(self._write_temporary(data), self.path)  # the name is never empty while held
        return _digest(data)

    def delete(self, version: str) -> bool:
        aside = self._set_aside(version)
        if aside is not None:
            os.unlink(aside)
        for made in self.made_dirs:  # deepest first; kept once the store is in them
            with suppress(OSError):
                os.rmdir(made)
        return aside is not None

    def _set_aside(self, version: str) -> str | None:
        """Rename the lease aside if it is still at ``version``; only one of several callers can."""
        aside = f"{self.path}.{uuid.uuid4().hex}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        if _digest(Path(aside).read_bytes()) == version:
            return aside
        with suppress(FileExistsError):  # another writer's fresh lease: put it back
            os.link(aside, self.path)
        os.unlink(aside)
        return None

    def _write_temporary(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        return tmp


class _S3Object:
    """Conditional writes (S3 and compatible services that honour If-None-Match / If-Match)."""

    settle_s = 0.5  # a service that ignores the conditions still ends with one winner, seen by all

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key = fs.split_path(path)[:2]

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get():
            out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await out["Body"].read(), out["ETag"]
            finally:
                out["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    renew = replace

    def delete(self, version: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def _put(self, data: bytes, **condition) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                  ContentType="application/json", **condition)
        except OSError as e:
            if _precondition_failed(e):
                return None
            raise
        return out["ETag"]


class _FsspecObject:
    """Any other fsspec store: plain writes, read back after ``settle_s`` (the last writer wins)."""

    settle_s = 2.0

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, data: bytes) -> str | None:
        if self.fs.exists(self.path):
            return None
        self.fs.pipe_file(self.path, data)
        return _digest(data)

    def replace(self, data: bytes, version: str) -> str | None:
        found = self.read()
        if found is None or found[1] != version:
            return None
        self.fs.pipe_file(self.path, data)
        return _digest(data)

    renew = replace

    def delete(self, version: str) -> bool:
        found = self.read()
        if found is None or found[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True


def _backend(path: str):
    if not is_url(path):
        return _LocalObject(path)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    return _S3Object(fs, inner) if hasattr(fs, "call_s3") else _FsspecObject(fs, inner)


def _precondition_failed(error: OSError) -> bool:
    """Whether s3fs's error is S3's 412 (or 409 for a concurrent conditional write)."""
    if isinstance(error, FileExistsError):
        return True
    cause = error.__cause__ or error.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or "pre-condition" in str(error)


# -- small helpers ----------------------------------------------------------------------------------


def _machine() -> dict:
    """Who this process is: a pid means something only on the same host, boot and pid namespace."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    try:
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_namespace = None
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_namespace": pid_namespace}


def _same_machine(holder: dict) -> bool:
    mine = _machine()
    return all(holder.get(k) == v for k, v in mine.items()) and mine["boot_id"] is not None


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process that its parent has not reaped yet is a zombie: gone all the same
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _who(holder: dict | None) -> str:
    return "an unknown run" if holder is None else f"pid {holder.get('pid')} on {holder.get('host')}"


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, indent=1).encode()


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("encoding-type") != LEASE_ENCODING:
        return None
    return record


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> float:
    return time.time()


def _iso(t: float, timespec: str = "milliseconds") -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec=timespec)


def _time(iso: str | None) -> float:
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return 0.0  # no heartbeat readable: as old as can be

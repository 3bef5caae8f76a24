"""Plain files: atomic writes, stale temporaries, the output check and lock, JSON and JSON lines, sha256,
downloads.

Every output of the project reaches its final name through `atomic` (a temporary file renamed into
place), so an interrupted run never leaves a partial file under a final name; `remove_stale_temporaries`
cleans the temporaries of writers that died. `check_output` refuses an unwritable output before any work
and `claim` holds an output folder for one writer. JSON-lines files (`results.jsonl`) are appended one
record per `write` call and read torn-line tolerant.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence

from neon.errors import NeonError, first_sentence

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    On an exception the temporary file is removed and the exception re-raised, so `path` is
    either untouched or complete. The temporary name starts with '.' (snapshot globs skip it)
    and ends with the suffix of `path` (numpy's `savez` would otherwise append '.npz').
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(name)[1]
    remove_stale_temporaries(directory, name)
    tmp = os.path.join(directory, f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise named(e, path) from None
        raise


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """`atomic` for a folder: yield a temporary folder next to `path`; on success it replaces `path`
    (a folder already there is moved aside first and removed after), on an exception it is removed."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory, name)
    tmp = os.path.join(directory, f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.isdir(path):
            old = os.path.join(directory, f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise named(e, path) from None
        raise


def named(e: OSError, path: str) -> OSError:
    """`e` as an OSError of its errno naming `path` (the final name, not a temporary's): what the
    error printer shows. Errors of a temporary, or of a write that names no file, get `path`."""
    parts = str(e.filename).split(os.sep) if e.filename is not None else [".x.h-1-00000000.tmp"]
    if not any(_TEMPORARY.match(part) for part in parts):
        return e
    return OSError(e.errno, e.strerror or str(e), os.fspath(path))


_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.[^.]*)?$")


def remove_stale_temporaries(directory: str, name: str | None = None) -> list[str]:
    """Remove the temporaries `atomic` left in `directory` (for `name`, or any) when the process that
    wrote them, on this host, is gone (a killed merge or sample). Returns the removed paths."""
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry)
        if not match or (name is not None and match["name"] != name) or match["host"] != _HOST:
            continue
        if _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            stale = os.path.join(directory, entry)
            if os.path.isdir(stale) and not os.path.islink(stale):  # left by `atomic_folder`
                shutil.rmtree(stale)
            else:
                os.remove(stale)
            removed.append(os.path.join(directory, entry))
            logger.info("removed %s, left by an interrupted run", removed[-1])
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output(path: str, kind: str, suffixes: Sequence[str] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written: `kind` 'dir' (a folder that
    may exist) or 'file' (a file that may exist, not a folder; with one of `suffixes` when given). A
    missing parent folder is fine (it is created) unless a file stands in its way or the nearest
    existing one is not writable."""
    path = os.fspath(path)
    if not path:
        raise NeonError("an output path is empty")
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise NeonError(f"{path} exists and is not a directory; choose another output folder")
    if kind == "file":
        if os.path.isdir(path):
            raise NeonError(f"{path} is a directory; the output is a file")
        if suffixes and not path.lower().endswith(tuple(suffixes)):
            raise NeonError(f"{path}: the output file must end in {' or '.join(suffixes)}")
    parent = os.path.abspath(path if kind == "dir" else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NeonError(f"cannot create {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):  # (root passes; its failures come as OSError at creation)
        why = "on a read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "not writable"
        raise NeonError(f"cannot create {path}: {parent} is {why}")


LOCK = ".neon.lock"


BOOKKEEPING = {LOCK, "config.resolved.yaml", "log.txt"}  # files that hold no work of a run


@contextlib.contextmanager
def claim(directory: str, command: str, keep_on_error: Callable[[str], bool] = lambda name: True):
    """Hold the output folder `directory` for one writer: creates it when missing, takes an advisory
    lock (`.neon.lock`, holding the writer's host, pid and command; a second writer gets a NeonError
    naming it) and releases it at the end. On an exception, a folder this call created is removed
    again when it holds nothing but bookkeeping and files for which `keep_on_error(name)` is false,
    so a failed first run leaves nothing behind. Not collective: call it on one rank."""
    check_output(directory, "dir")
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    lock_path = os.path.join(directory, LOCK)
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        try:
            info = json.loads(holder)
            who = f"{info['command']} (pid {info['pid']} on {info['host']})"
        except (ValueError, KeyError, TypeError):
            who = "another neon process"
        raise NeonError(
            f"{directory} is in use by {who}; wait for it to finish or choose another output"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
    except OSError as e:  # a full disk: the lock's line did not fit
        _release(lock_path, handle)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise named(e, lock_path) from None
    try:
        yield directory
    except BaseException:
        _release(lock_path, handle)
        if created:
            left = [n for n in os.listdir(directory) if n not in BOOKKEEPING and keep_on_error(n)]
            if not left:
                shutil.rmtree(directory, ignore_errors=True)
        raise
    _release(lock_path, handle)


def _release(lock_path: str, handle) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path)
    with contextlib.suppress(OSError):  # a buffer that a full disk refused is dropped with the file
        handle.close()


def write_json(path: str, obj: object) -> None:
    """Write `obj` as indented JSON with a trailing newline, atomically."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def append_jsonl(path: str, record: dict) -> None:
    """Append `record` as one JSON line (NaN and ±inf written as null) in one `write` call on an
    O_APPEND descriptor, so a crash leaves at most a torn last line. A torn last line (no newline: an
    append that died) is first dropped from the file, rewritten atomically, so that the file stays
    valid JSON lines for every reader (`pandas.read_json(lines=True)`). An I/O error (a full disk) cuts
    the file back to where it was: no partial line stays."""
    data = (json.dumps(finite_json(record), allow_nan=False) + "\n").encode()
    drop_torn_tail(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):  # a short write: the disk filled during it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise named(e, path) from None
    finally:
        os.close(fd)


def drop_torn_tail(path: str) -> bool:
    """Drop the torn last line of a JSON-lines file (the bytes after its last newline), rewriting it
    atomically; True when there was one. A missing or whole file is left alone."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        return False
    if not content or content.endswith(b"\n"):
        return False
    cut = content.rfind(b"\n") + 1
    with atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(content[:cut])
    logger.warning("%s: dropped its torn last line (an interrupted write)", path)
    return True


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file written by `append_jsonl` ([] when there is none). A line that
    does not parse (the torn tail of an interrupted append) is skipped with a warning."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                logger.warning(
                    "%s: line %d is not a JSON record (an interrupted write?); skipped", path, number
                )
                continue
            records.append(record)
    return records


def finite_json(value):
    """A JSON-able `value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks; of a folder, the SHA-256 of its files' relative
    paths and digests, in sorted order (links followed)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path, followlinks=True):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                digest.update(f"{os.path.relpath(full, path)}\0{sha256(full)}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest_dir: str) -> str:
    """Fetch `url` into `dest_dir` once and return the local path.

    A local path that exists is returned as it is. A URL (http(s)://, file://) is fetched with
    urllib into `dest_dir/<last path component>`, atomically, unless that file already exists.
    Not collective: wrap it in `distributed.main_first()` when every rank needs the file.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "" or os.path.exists(url):
        if not os.path.exists(url):
            raise NeonError(f"no such file: {url}")
        return url
    name = os.path.basename(urllib.parse.unquote(parsed.path))
    if not name:
        raise NeonError(f"cannot download {url}: the URL does not end in a file name")
    dest = os.path.join(dest_dir, name)
    if os.path.exists(dest):
        return dest
    logger.info("downloading %s to %s", url, dest)
    try:
        with atomic(dest) as tmp, urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 2**20)
    except (OSError, ValueError) as e:
        reason = e.reason if type(e) is urllib.error.URLError else e  # HTTPError reads better whole
        raise NeonError(f"cannot download {url}: {first_sentence(reason)}") from None
    return dest

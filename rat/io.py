"""File writes that never leave a torn or half-written file: atomic replace, temp-file hygiene, writable checks.

Every file rat writes that a later run reads back (checkpoints, evaluation state and result files) goes through
:func:`atomic_write`. Its temporary files are named ``.<name>.<pid>.<random>.tmp`` so that a later start can remove
the leftovers of a killed writer (:func:`remove_stale_temps`) without touching a write still in progress.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

__all__ = ["DuplicateKeyError", "FileLock", "OutputError", "atomic_write", "check_writable", "pid_alive", "read_json",
           "read_yaml", "remove_stale_temps"]


class OutputError(OSError):
    """An output folder or file that cannot be written; the message names it and the fix."""


class DuplicateKeyError(yaml.YAMLError, ValueError):
    """A YAML mapping or JSON object that gives one key twice (PyYAML and ``json`` would keep the last value without a
    word)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at every level. Keys merged in with ``<<``
    may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, tuple[int, int]] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                at = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if seen:  # a one-line (JSON-style) mapping: the columns tell the two apart
                    where = (f"lines {first[key][0]} and {at[0]}" if first[key][0] != at[0] else
                             f"line {at[0]}, columns {first[key][1]} and {at[1]}")
                    raise DuplicateKeyError(f"key {key!r} is given twice ({where}), and only the last would count")
                first[key] = at
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML (or JSON) file, read with a safe loader that refuses duplicate keys; every YAML file rat
    reads goes through here.

    Raises:
        OSError, UnicodeDecodeError: the file cannot be read as text.
        DuplicateKeyError: a mapping gives a key twice (the message names it and its lines).
        yaml.YAMLError: the file is not valid YAML.
    """
    return yaml.load(Path(path).read_text(), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKeyError(f"key {key!r} is given twice in one object, and only the last would count")
        seen.add(key)
    return dict(pairs)


def read_json(path: str | Path) -> Any:
    """The content of a JSON file that people may edit (a result, a classes file), refusing a key given twice in one
    object as :func:`read_yaml` does; every such JSON file rat reads goes through here.

    Raises:
        OSError, UnicodeDecodeError: the file cannot be read as text.
        DuplicateKeyError: an object gives a key twice (the message names it).
        json.JSONDecodeError: the file is not valid JSON.
    """
    return json.loads(Path(path).read_text(), object_pairs_hook=_unique_pairs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> Path:
    """Call ``write(handle)`` on a temporary file in ``path``'s folder, fsync it, rename it over ``path`` and fsync
    the folder. A crash or a full disk at any point leaves the previous file at ``path`` intact, never a torn one; a
    failed write removes its temporary file. The file gets the permissions of a plain ``open()`` (0666 less the
    umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def remove_stale_temps(folder: str | Path, name: str = "*") -> list[Path]:
    """Remove the temporary files that killed :func:`atomic_write` calls left in ``folder`` (for target ``name``, or
    every target); files of writers still running on this machine are kept. Returns the removed paths."""
    removed = []
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        pid_text = tmp.name[:-len(".tmp")].split(".")[-2]
        if pid_text.isdigit() and pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that a file can be created in it (a real write, which also catches
    read-only mounts and full disks that permission bits do not show).

    Raises:
        OutputError: the folder cannot be created or written; the message names it and says what to do.
    """
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise OutputError(errno.ENOTDIR, "exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".write-check.{socket.gethostname()}.") as handle:
            handle.write(b"x")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"{what} {folder} is not writable ({reason}): free space or fix its permissions, or "
                          "choose another folder") from exc
    return folder


class FileLock:
    """An exclusive claim on a piece of work, held as a ``flock`` on ``path`` while the holder lives.

    The kernel drops the lock when its holder exits, however it dies (SIGKILL, OOM, a lost node on NFS with lockd), so
    a dead process's lock file never blocks anyone: it is only a file with the last holder's pid, host and start time,
    which :meth:`holder` reports. The lock file is removed on release.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; returns whether this object holds it now."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # else the holder released (and unlinked) it between our open and flock: try the new file
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        return True

    def acquire(self, poll: float = 0.2) -> FileLock:
        """Wait until this object holds the lock (polling every ``poll`` seconds); returns self, for ``with``."""
        while not self.try_acquire():
            time.sleep(poll)
        return self

    def holder(self) -> str:
        """``pid N on HOST since HH:MM:SS`` of the process that wrote the lock file last (for messages)."""
        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
            return f"pid {info['pid']} on {info['host']} since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first, so nobody locks the old file after us)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

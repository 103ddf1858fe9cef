"""A run folder's identity and its lock: a marker file written when modular creates the folder, and an
advisory lock held while a command writes it, so no other folder is overwritten and no two commands write one.

`RunFolder.open()` runs before anything is validated and writes nothing (it locks a folder that is already a
run); `establish()` runs once the inputs are known to be good: it creates the folder, locks it, writes the marker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from modular.atomic import atomic_write_json
from modular.errors import ConfigError, RunFolderError

MARKER = "modular-run.json"  # written at creation: {"format": 1, "created": ..., "command": ...}
LOCK = ".lock"  # flock'ed while a command writes the folder; holds the holder's pid, host, command, start
LEGACY_FILES = ("overrides.json",)  # a run folder written before markers existed holds these


class RunFolder:
    """The folder of one run, as used by one command (`train`, `continual`, `info`...)."""

    def __init__(self, path: str | os.PathLike, command: str):
        self.path = Path(path)
        self.command = command
        self._lock_fd: int | None = None

    # -- identity ---------------------------------------------------------------------------------
    def state(self) -> str:
        """"new" (nothing there), "empty", "run" (has the marker), "legacy" (a run from before markers)."""
        if not self.path.exists():
            return "new"
        if not self.path.is_dir():
            raise ConfigError(f"run.dir={self.path} is a file, not a folder; choose another run.dir.")
        if (self.path / MARKER).is_file():
            return "run"
        names = {p.name for p in self.path.iterdir()} - {LOCK}
        if not names:
            return "empty"
        if any(name in names for name in LEGACY_FILES):
            return "legacy"
        shown = ", ".join(sorted(names)[:3]) + (" …" if len(names) > 3 else "")
        raise ConfigError(
            f"run.dir={self.path} already exists and is not a modular run folder (it has no {MARKER}, but holds "
            f"{shown}); name a new or empty folder, so that nothing in it is overwritten."
        )

    def open(self) -> RunFolder:
        """Refuse a file or a foreign folder, and lock a folder that already is a run. Writes nothing else."""
        if self.state() in ("run", "legacy"):
            self._lock()
        return self

    def establish(self) -> None:
        """Create the folder if it is new, lock it and write its marker: call once the inputs are validated."""
        if self._lock_fd is None:  # new or empty at open(): nothing in it needed protecting until now
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # An empty folder the user made, or one another process made meanwhile: the lock decides.
            with contextlib.suppress(FileExistsError):
                self.path.mkdir()
            self._lock()
            if self.state() != "empty":
                self.close()
                raise RunFolderError(f"run.dir={self.path} was made a run folder by another process while this "
                                     f"one was starting; choose another run.dir, or resume it with modular "
                                     f"{self.command} run.dir={self.path}.")
        if not (self.path / MARKER).is_file():
            if self.state() == "legacy":
                print(f"note: {self.path} was written before run folders had a marker; adding {MARKER}.",
                      file=sys.stderr)
            write_marker(self.path, self.command)

    # -- lock -------------------------------------------------------------------------------------
    def _lock(self) -> None:
        """Take the advisory lock (released when the process ends, whatever the cause), or refuse."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise RunFolderError(f"run.dir={self.path} cannot be written ({exc.strerror}); modular {self.command} "
                                 "writes its run folder, so choose one you can write.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunFolderError(f"run.dir={self.path} is in use by {holder}; two commands never write one run "
                                 "folder at once: wait for it to finish, stop it, or choose another run.dir.") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            print(f"warning: the file system of {self.path} does not support locks; a second command writing this "
                  "run folder at the same time would not be detected.", file=sys.stderr)
        previous = _read_holder(fd)
        if previous:  # a clean release empties the file; the kernel dropped this holder's lock when it died
            print(f"note: taking over the stale lock of {self.path} left by {_describe(previous)}, which is no "
                  "longer running.", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": f"modular {self.command}",
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock; the (emptied) lock file stays, so every process always locks the same file."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def write_marker(folder: Path, command: str) -> None:
    """Mark `folder` as a run folder that `modular <command>` created (also inside a staged, not yet renamed one)."""
    atomic_write_json(Path(folder) / MARKER, {"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "command": command})


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"{holder.get('command', 'another modular command')} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")

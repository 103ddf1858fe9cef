"""Our own files: written atomically, read defensively.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target: a crash
or kill at any moment leaves either the old file or the new one. Reads of JSON files report damage in one
sentence, and JSON Lines readers drop a torn last line (a write cut short by a crash or a full disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        follow_umask(tmp)  # mkstemp creates 0600; a normal file respects the umask
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary sibling folder; on success its files are made durable and it replaces `path`
    (an existing folder is swapped out whole), so readers see the old folder or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a normal folder respects the umask
        yield tmp
        for file in tmp.iterdir():
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file (0666) or folder (0777) the permissions the user's umask asks for.

    For what libraries or tempfile create with private modes (safetensors files 0600, mkdtemp 0700).
    """
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~_umask())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks (integrity manifests and cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, what: str):
    """The JSON document in `path`; a damaged one raises RunFolderError naming the file and `what` it holds."""
    from modular.errors import RunFolderError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} is damaged: it should hold {what} as JSON, but {_reason(exc)}.") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON Lines file. A torn last line is dropped; damage before it raises RunFolderError."""
    from modular.errors import RunFolderError

    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if number == len(lines):  # the last line, with no newline after it: a write cut short
                break
            raise RunFolderError(f"{path} is damaged at line {number}: {_reason(exc)}; move the file away to go "
                                 "on without its records.") from None
    return records


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"byte {exc.start} is not UTF-8"
    return f"it is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"

"""The output folder of a run: one run at a time, checked before anything loads, write failures said in one line.

    with claim_output_dir(config.loop.output_dir):      # every recipe's run_* wraps setup -> train -> save in this
        ...

- `claim_output_dir` refuses a path that is a file or cannot be created or written, and has the main process hold an
  exclusive lock (`OUTPUT/.ivl-run.lock`, `fcntl.flock`) for the run's lifetime. A second run into the folder
  refuses, naming the holder (pid, host, start time). The kernel releases a flock when its holder exits, however it
  exits (SIGKILL included), so a dead run's lock is simply taken over: there is no stale-lock guess to get wrong.
  The other processes of a multi-process run are the same run: they take no lock. flock is advisory and local: on a
  network filesystem it holds only as far as that filesystem forwards locks (Linux NFS does, as POSIX locks).
- `write_error` turns a failed write (disk full, read-only, a file in the way) into an `OutputError` naming the path
  and the cause, which the command line prints as one line.
- `temporary_path` gives names unique per host and process, so two writers never assemble into the same temp file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ivl.errors import OutputError

LOCK_FILE = ".ivl-run.lock"


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path` that no other process (on any host) would choose: `.NAME.tmp-HOST-PID`."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def is_main_process() -> bool:
    """Process 0 of a `torchrun` / `accelerate launch` run, or a single process (no accelerator exists yet)."""
    return int(os.environ.get("RANK", "0")) == 0


def write_error(path: Path | str, error: BaseException, then: str = "") -> OutputError:
    """One line for a failed write: the path, the cause (`No space left on device`, `Permission denied`, ...) and
    `then`, what it means for the run."""
    if isinstance(error, OSError):
        cause = error.strerror or str(error)
    else:  # safetensors reports I/O errors as text: `... Os { code: 28, kind: StorageFull, message: "No space ..." }`
        found = re.search(r'message: "([^"]+)"', str(error))
        cause = found.group(1) if found else str(error)
    return OutputError(f"cannot write {path}: {cause}" + (f"; {then}" if then else ""))


@contextmanager
def claim_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """Check that `output_dir` is a writable folder (creating it) and, on the main process, hold its lock while the
    block runs."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputError(f"loop.output_dir={path} is a file, not a folder: choose another loop.output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"loop.output_dir={path} cannot be created: {error.strerror or error}") from error
    if not is_main_process():
        yield path
        return
    handle = _lock(path / LOCK_FILE)
    try:
        yield path
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _lock(path: Path) -> int:
    """Take the lock file's flock and write who holds it; refuse naming the holder when another run has it."""
    try:
        handle = _open_lock(path)
    except OSError as error:
        raise OutputError(f"loop.output_dir={path.parent} is not writable: {error.strerror or error}") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(handle)
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise OutputError(f"{path}: cannot lock the output folder: {error.strerror or error}") from error
        raise OutputError(f"loop.output_dir={path.parent} is in use by another run ({_holder(path)}); wait for it to "
                          "end or choose another loop.output_dir") from None  # fmt: skip
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, (json.dumps(holder) + "\n").encode(), 0)
    except OSError as error:
        os.close(handle)
        raise write_error(path, error) from error
    return handle


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown: {path} is being written"

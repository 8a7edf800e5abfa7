"""The lock of a directory that several processes may write at once (each host of a job on a
shared filesystem running the same command): one writes, the others wait for it.

The lock is `flock` on the file `<directory>.lock` beside the directory. The kernel releases it
when its holder exits, however it exits, so a lock file that a killed process left behind
blocks no one. The process that created the file removes it when it is done, still holding the
lock; a process that opened the file before that and then takes the lock sees that the file is
no longer the one at that path, and takes the lock of the new one instead: two processes never
hold the lock of one directory at once. A lock file this process did not create (a killed
run's, or a file of the user's that happens to have that name) is left as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def lock_beside(directory: Path, doing: str) -> Iterator[bool]:
    """Holds the lock of `directory`, saying "waiting for another process to finish `doing`
    `directory`" when it must wait; yields whether it waited. The lock file goes when the
    block ends, if this process created it."""
    directory = Path(os.path.abspath(directory))  # named: "." and ".." have no name to extend
    path = directory.with_name(directory.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd, created = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                print(f"waiting for another process to finish {doing} {directory}", flush=True)
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _is_file_at(fd, path):
            break
        os.close(fd)  # its creator removed it: the lock is now the new file's at `path`
    try:
        yield waited
    finally:
        if created:
            path.unlink()  # still held: whoever opened it meanwhile sees it gone
        os.close(fd)


def _open(path: Path) -> tuple[int, bool]:
    """A descriptor of the lock file `path`, and whether this call created it."""
    while True:
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDONLY), False
        except FileNotFoundError:  # removed by its creator between the two calls
            continue


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the file open as `fd` is still the one at `path`."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

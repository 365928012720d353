"""Errors that reach the user as one line and exit code 2."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for: bad config, missing path, unknown key.

    The CLI prints ``error: <message>`` on one line and exits with code 2, no traceback.
    """


#: OSError numbers that describe the user's machine rather than a bug in capfilt: a
#: read-only or full disk, missing permissions, a path through a file. They become a
#: UserError naming the path (see :func:`user_os_error`).
USER_ERRNOS: dict[int, str] = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.ENAMETOOLONG: "file name too long",
}

_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


def os_errno(err: OSError) -> int | None:
    """The error number of ``err``; pyarrow's IO errors carry it only in their text."""
    if err.errno is not None:
        return err.errno
    match = _ERRNO_IN_TEXT.search(str(err))
    return int(match.group(1)) if match else None


def user_os_error(err: OSError, path: str | os.PathLike[str] | None = None) -> UserError | None:
    """``err`` as a one-line UserError when it is about the disk or permissions, else None.

    The message names ``path`` when given (the file the caller meant to write, rather than
    its temporary name), else the file ``err`` names: ``runs/x/samples/shard-00000.parquet:
    no space left on device (ENOSPC)``.
    """
    number = os_errno(err)
    if number not in USER_ERRNOS:
        return None
    where = path if path is not None else (err.filename or None)
    problem = USER_ERRNOS[number]
    prefix = f"{Path(where)}: " if where is not None else ""
    return UserError(f"{prefix}{problem} ({errno.errorcode.get(number, number)})")

"""The one exception type daulat raises for bad input (config, data, checkpoint, request), and how the
CLI words the errors it can foresee.

The CLI turns a DaulatError, and the operating system's and the parsers' errors about the user's files
(missing, unreadable, full disk, malformed JSON or text), into a single line on stderr and exit code 2;
anything else is a bug in daulat and is reported as one (exit code 1). Library users can catch DaulatError.
"""

from __future__ import annotations

import errno


class DaulatError(Exception):
    """Bad input from the user: the message names the problem (file, field, tensor)."""


# Errors whose cause lies outside daulat: what the user gave it, or the machine it runs on.
FORESEEN = (DaulatError, OSError, ValueError, MemoryError, RecursionError)

_OS_WORDS = {
    errno.ENOENT: "does not exist",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "is not a directory",
    errno.EISDIR: "is a directory",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "is on a read-only file system",
    errno.ENAMETOOLONG: "name too long",
}


def describe(error: BaseException) -> str:
    """One line, in plain words, for an error of FORESEEN (the message of a DaulatError as it is)."""
    if isinstance(error, DaulatError):
        text = str(error)
    elif isinstance(error, OSError):
        words = _OS_WORDS.get(error.errno) or error.strerror or str(error) or type(error).__name__
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        text = f"{where}: {words}" if where else words
    elif isinstance(error, MemoryError):
        text = "out of memory" + (f" ({error})" if str(error) else "") + ": try a smaller model, batch or file"
    elif isinstance(error, RecursionError):
        text = "input nested too deeply to read"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split()) or type(error).__name__  # one line, whatever the message held

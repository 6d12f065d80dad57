"""User-facing errors.

Every problem caused by the user's input (a checkpoint, an option, a corpus, an output folder) is raised
as an :class:`AtlasError` whose message names the problem and the fix. The CLI prints the message on one
line and exits with status 2; it never shows a traceback for these. A failed file operation (``OSError``:
disk full, permission denied, read-only file system, ...) is turned into one by :func:`os_error`.
"""

import errno


class AtlasError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""

    exit_code = 2


def os_error(exc: OSError, path=None) -> AtlasError:
    """An :class:`AtlasError` for a failed file operation, naming the path (when known) and the fix."""
    where = exc.filename if exc.filename is not None else path
    at = f" ({where})" if where is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return AtlasError(f"the disk is full{at}: free some space, or pass -o/--output with a folder on a disk "
                          "with room, then rerun the same command (the analysis resumes where it stopped)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AtlasError(f"permission denied{at}: pass -o/--output with a folder you can write to "
                          "(or make the path readable and writable for you)")
    if exc.errno == errno.EROFS:
        return AtlasError(f"read-only file system{at}: pass -o/--output with a folder on a writable disk")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return AtlasError(f"{reason}{at}: check the path, or pass -o/--output with another folder")

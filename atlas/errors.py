"""User-facing errors.

Every problem caused by the user's input (a checkpoint, an option, a corpus, an output folder) is raised
as an :class:`AtlasError` whose message names the problem and the fix. The CLI prints the message on one
line and exits with status 2; it never shows a traceback for these.
"""


class AtlasError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""

    exit_code = 2

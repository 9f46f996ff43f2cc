"""User-facing errors.

Anything a user can cause (a bad file, a bad config value, a checkpoint that does not fit) raises ``GkdError`` with a
one-line message that names the file, field or value and what was expected. The ``gkd`` CLI prints it as
``gkd: error: <message>`` and exits with status 2, without a traceback. Programming errors keep their tracebacks.
"""

__all__ = ["GkdError"]


class GkdError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        message = str(message)
        if "Original Traceback" in message:
            # Re-raised by a DataLoader worker: torch wraps the worker's traceback into the message. Keep only the
            # original one-line message (the last line, "gkd.core.errors.GkdError: <message>").
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("GkdError: ", 1)[-1]
        # Keep it one line whatever the caller formatted.
        super().__init__(" ".join(message.split()))

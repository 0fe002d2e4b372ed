"""User-facing errors.

Every error a user can cause (bad input, a refused file, a name collision) is a `StudioError` whose message is one
line saying what was expected and what was found. The CLI prints it as ``error: <message>`` and exits non-zero; the UI
shows it in the page. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class StudioError(Exception):
    """An error caused by the user's input, shown to them as one line."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # Keep the message on one line: it is printed as-is to a terminal or a web page.
        super().__init__(" ".join(str(message).split()))


class InvalidInputError(StudioError):
    """Input (an argument, a config value, a request field) that does not have the expected form."""


class UnsafeFileError(StudioError):
    """A file that would need more than tensors and plain containers to load (for example a code-running pickle)."""


class CorruptFileError(StudioError):
    """A file that is truncated, lies about its layout, or holds NaN/Inf values."""


class FamilyMismatchError(StudioError):
    """An adapter made for another model family than the base model in use."""


class NotFoundError(StudioError):
    """A named thing (adapter, job, base model) that does not exist."""


class AlreadyExistsError(StudioError):
    """A name that is already taken; the studio never overwrites silently."""


class NotAvailableError(StudioError):
    """A feature that is not available yet (or not on this machine)."""

    exit_code = 3

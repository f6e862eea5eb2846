"""User-facing errors.

Anything a user can fix (bad config, missing data, incompatible checkpoint)
raises :class:`UserError` with ONE line that names the problem and the fix.
Entry points catch it, print ``error: <message>`` to stderr and exit with
status 2, so no traceback buries the message.
"""


class UserError(Exception):
    """A problem in the user's input, with a one-line message saying how to fix it."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; fix: {fix}"
        # One line, always: multi-line messages get lost in torchrun's interleaved output.
        super().__init__(" ".join(message.split()))


def exit_on_user_error(fn):
    """Decorator for CLI ``main`` functions: UserError -> one stderr line + exit code 2."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(UserError.exit_code)

    return wrapper

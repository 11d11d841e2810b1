"""The harness's errors: bad input is one line on stderr and an exit code, never a traceback."""
import sys


class UserError(Exception):
    """Bad input from the user: the scripts print its one-line message and exit with code 2."""


class NonFiniteError(UserError):
    """A non-finite loss or gradient: the run stops before that step touches the weights (exit 3)."""


def fail(message: str, code: int = 2):
    """Print one line to stderr and exit: no traceback for bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)

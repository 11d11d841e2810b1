"""The harness's errors: bad input is one line on stderr and an exit code, never a traceback."""
import json
import sys


class UserError(Exception):
    """Bad input from the user: the scripts print its one-line message and exit with code 2."""


class NonFiniteError(UserError):
    """A non-finite loss or gradient: the run stops before that step touches the weights (exit 3)."""


def fail(message: str, code: int = 2):
    """Print one line to stderr and exit: no traceback for bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def read_text(path, encoding: str = "utf-8") -> str:
    """A text file's contents; a file that is not in `encoding` (Latin-1 bytes, UTF-16) or cannot
    be read is a UserError naming it, not a traceback."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"{path}: byte {e.start} is not {encoding.upper().removesuffix('-SIG')} text{hint}; "
                        f"save the file as UTF-8") from None


def read_json(path):
    """A JSON file; not UTF-8 or not JSON is a UserError naming it."""
    try:
        return json.loads(read_text(path))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); the file is damaged") from None

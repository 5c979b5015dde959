"""The one exception type users see.

A `UserError` carries a one-line message that says what is wrong, which file or key, the
expected and the actual value, and how to fix it. The CLI prints it without a traceback
(``--debug`` shows one). `assert` is kept for internal invariants only.
"""


class UserError(Exception):
    """Bad input from the user: a file, a config key, a flag. Printed as one line."""

    exit_code = 2


class CheckFailed(UserError):
    """A check ran and found problems (for example ``inspect --config``). Exit status 1."""

    exit_code = 1

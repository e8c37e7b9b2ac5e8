"""The one error type users see: a one-line message, exit code 2, no traceback."""


class HarnessError(Exception):
    """Bad config, bad input file or bad usage. The CLI prints `error: <msg>` and exits 2.

    The message names the key or file and says how to fix it.
    """

    exit_code = 2

"""Error types the command maps to exit codes (2: the user's input, 1: a verification failure)."""


class UserError(Exception):
    """Bad input or usage: printed as one line, exit code 2. The message names the file and the fix."""


class VerificationError(Exception):
    """An artifact failed a numeric check: exit code 1."""

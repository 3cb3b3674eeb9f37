"""Typed errors, each with the exit code the command maps it to (a stable contract for CI).

0 success; 1 a verification failed (VerificationError); 2 the user's input or usage (UserError); 3 this machine's
environment or a bug of ours (EnvironmentProblem; any other exception is reported as internal, exit 3 too).
"""

EXIT_OK = 0
EXIT_VERIFICATION = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3


class BottlefitError(Exception):
    """Printed as one line; ``exit_code`` says whose problem it is."""

    exit_code = EXIT_ENVIRONMENT


class UserError(BottlefitError):
    """Bad input or usage: the message names the file or flag and the fix. Exit code 2."""

    exit_code = EXIT_USAGE


class VerificationError(BottlefitError):
    """An artifact failed a numeric check. Exit code 1."""

    exit_code = EXIT_VERIFICATION


class EnvironmentProblem(BottlefitError):
    """Something this machine lacks or that failed in it (a runtime, an emulator, a GPU, a converter), not the
    user's input: the message says what to install or where to run instead. Exit code 3."""

    exit_code = EXIT_ENVIRONMENT


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during an export, raised (like Ctrl-C's KeyboardInterrupt) so that its cleanup runs. The
    command exits 128 + the signal number, as a shell reports a process the signal ended."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum

"""The exceptions the CLI turns into exit codes: mistakes a user can fix (bad file, bad flag, bad config),
and a command stopped on a signal."""


class UserError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with code 2."""


EXIT_CTRL_C = 130  # the shell's code for a command ended by SIGINT (128 + 2): `make` and `&&` chains stop too


class Stopped(Exception):
    """A command stopped on a signal after saving its finished work and printing the line that says so;
    `rrm-jax` exits with `exit_code`."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code

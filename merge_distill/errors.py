"""User-facing errors: every command prints these without a traceback and exits with code 2."""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem the user can fix (recipe, paths, data, run directory).

    `problems` is a list of one-line messages; each names the recipe key or file, what was
    given, what is allowed, and how to fix it.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class NonFiniteError(RuntimeError):
    """NaN or inf in a tensor of a training step, cache write or evaluation; the message names
    the step, tensor and source. Not a user error: the CLI exits with code 1."""

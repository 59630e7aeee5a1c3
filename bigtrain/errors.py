"""Errors a user can fix: the CLI prints the message (no traceback) and exits with status 2; failures of the
machine bigtrain has handled (exit 1, also without a traceback)."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, paths, data) with a message that says how to fix it."""


class EnvironmentFailure(Exception):
    """A failure of the machine, not of the input (a full disk, a read-only folder) that bigtrain has already
    cleaned up after: the CLI prints the message without a traceback and exits with status 1."""


EXIT_OK = 0
EXIT_FAILURE = 1  # a failure that is not the user's input (e.g. a checkpoint save hit a full disk)
EXIT_USER_ERROR = 2


def missing_package(package: str, what: str, alternative: str, error: ImportError) -> UserError:
    """The error for a feature whose optional import failed: what needs it, how to install it, what to use instead.

    bigtrain imports deepspeed, datasets, wandb and matplotlib only where a feature needs them, so that a
    ``pip install --no-deps`` (e.g. on a GPU image) still trains; choosing the feature then says this.
    """
    return UserError(f"{what} needs the `{package}` package, which cannot be imported ({error}). Install it "
                     f"(`pip install -c constraints.txt {package}` in a bigtrain checkout; `make setup` installs "
                     f"it), or {alternative}.")

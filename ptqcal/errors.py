"""Errors that mean "this input cannot be used" (a shared leaf: stages may import it; it imports nothing).

Each stage raises its own subclass of :class:`InputError` with a message in the stage's terms
(``ModelError``, ``QuantizeError``, ``DataError``, ``RunRecordError``). A stage names the *setting*
at fault, never a command-line flag; the command line turns the setting into its flag
(``ptqcal.cli``) and prints one line with exit code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used. ``setting`` names the :class:`~ptqcal.config.RunConfig` field
    at fault, when one is (e.g. ``"weights"``), so that the face can name its flag."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting

    def __reduce__(self):  # raised in a child process or a Ray task, it arrives whole, setting included
        return type(self), (str(self), self.setting)


class UserError(InputError):
    """The face's own input errors: its messages may name command-line options."""

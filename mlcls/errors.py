"""Errors a user can act on.

Every `MlclsError` carries a one-line message that names the problem and what
to do about it; the CLI prints it as is and exits non-zero, without a
traceback. Anything else that escapes is a bug.
"""

from __future__ import annotations


class MlclsError(Exception):
    """A problem with the user's input, fixable by the user."""


class SourceError(MlclsError):
    """The image source is missing, empty, unreadable or malformed."""


class BundleError(MlclsError):
    """The model bundle is missing, malformed, or does not match its weights."""


class OutputError(MlclsError):
    """The output location cannot be written, or holds incompatible data."""


class OptionError(MlclsError):
    """An option has a value that cannot work."""


class LabelsError(MlclsError):
    """A labels file is missing, malformed, or does not match its images or the model's classes."""

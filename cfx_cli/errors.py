"""Exceptions that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class CfxError(Exception):
    """Base class for errors with a message meant for the user."""

    exit_code = 1


class UsageError(CfxError):
    """Bad flags, unknown method/target/classifier, unreadable config: exit 2 before any work starts."""

    exit_code = 2


class InputError(CfxError):
    """One input cannot be used (unreadable image, ...): fails its own record, not the run."""


class ClassifierError(CfxError):
    """The classifier failed or answered something malformed."""


class MetricUnavailable(CfxError):
    """A metric cannot be computed for this run; the message says why (missing weights, no masks, ...)."""

"""Errors of the download package, kept apart so that every module (and the CLI) can catch them cheaply."""

from __future__ import annotations


class DownloadError(RuntimeError):
    """A model or tokenizer could not be obtained; the message names every source tried and why it failed."""


class SourceError(Exception):
    """One source (one provider/repo) failed; collected by the caller into a DownloadError."""


class NotFoundError(SourceError):
    """The repo answered, but the file is not there (lets folder downloads probe optional files)."""


class VerificationError(SourceError):
    """The bytes arrived but their size or hash is wrong; the partial file has already been deleted."""

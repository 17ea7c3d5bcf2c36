"""Errors of the photo pipeline, in a module without heavy imports (no torch) for worker processes."""

from __future__ import annotations


class PhotoError(ValueError):
    """A photo could not be read; the message names the file."""

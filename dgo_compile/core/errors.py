"""Typed errors. The library raises these and never exits; the CLI maps each to a one-line message."""

from __future__ import annotations


class DgoError(Exception):
    """Base class: the message is one line that says what is wrong and what to do.

    Messages name settings as config fields (`keep_macs`), in backticks, and list them in `fields`;
    the command line renders each as its option (`--keep-macs`), so no caller is told about an option
    it never had."""

    def __init__(self, *args, field: str | tuple[str, ...] | None = None):
        super().__init__(*args)
        self.fields: tuple[str, ...] = (field,) if isinstance(field, str) else tuple(field or ())


class ModelLoadError(DgoError):
    """A model path could not be read: missing, not a diffusers folder, corrupt weights, hub id."""


class UnsupportedModelError(ModelLoadError):
    """The folder holds a diffusers class that dgo-compile does not compile."""


class TraceError(DgoError):
    """Tracing failed, or the traced graph does not reproduce the eager model."""


class PassError(DgoError):
    """A pass failed or left an invalid graph, or broke its declared contract; the message names the pass."""


class AnnotationMissingError(PassError):
    """An accessor found no annotation: the message names the pass that writes it ("run pass X first")."""

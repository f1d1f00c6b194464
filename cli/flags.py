"""The one table from config fields to command-line options: library errors name fields (`keep_macs`),
and the command line renders each as the option its user typed (`--keep-macs`)."""

from __future__ import annotations

# Fields whose option is not `--` + the field with dashes.
FLAGS = {"n": "-n", "output": "-o", "class_labels": "--class-label"}


def flag(field: str) -> str:
    """The command-line option of a config field."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def render(exc: Exception) -> str:
    """A library error's message with the fields it names (in backticks) written as options."""
    message = str(exc)
    for field in getattr(exc, "fields", ()):
        message = message.replace(f"`{field}`", flag(field))
    return message

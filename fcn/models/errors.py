"""The error raised for bad model names, arguments and weight files."""


class ModelError(ValueError):
    """A model cannot be built as asked; the message names the bad value and the fix."""

"""The one error type of the data layer."""


class DataError(ValueError):
    """Bad or missing data; the message names the file or folder and the fix."""

"""The one error type of the data layer."""


class DataError(ValueError):
    """A problem in training data; the message names the file, the line (or row) and the field."""

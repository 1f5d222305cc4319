"""The one error type of bad data configuration, shared by every data module."""


class SourceError(ValueError):
    """A source specification or source data that cannot work; the message names the source and the fix."""

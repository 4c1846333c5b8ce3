"""The one exception type that the command line turns into a clear message and a non-zero exit."""


class SpinemetsError(Exception):
    """Bad input or a failed step, described for a person: which file, and what is wrong with it."""

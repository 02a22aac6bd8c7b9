"""Exception types raised by sqs-pyro."""


class SQSInputError(ValueError):
    """Bad user input (config, model, data), raised before any long work starts."""


class CompressedFileError(ValueError):
    """A compressed file is unreadable: truncated, corrupted, tampered or of an unknown version."""

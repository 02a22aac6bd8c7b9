"""Exception types raised by sqs-pyro."""


class SQSInputError(ValueError):
    """Bad user input (config, model, data), raised before any long work starts."""


class CompressedFileError(ValueError):
    """A compressed file is unreadable: truncated, corrupted, tampered or of an unknown version."""


class SQSDivergenceError(RuntimeError):
    """Training kept diverging (non-finite loss or gradient) after the allowed rollbacks."""

"""Errors of model/ that callers catch without importing torch (``capfilt``'s CLI maps them to one line)."""


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded as asked (missing files, pickle refused, bad keys)."""

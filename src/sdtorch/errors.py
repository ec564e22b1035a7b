"""Errors that the CLI turns into one clear line and a non-zero exit."""


class SDTorchError(Exception):
    """A user-facing failure: the message names the file and what is wrong."""


class CheckpointError(SDTorchError):
    """A checkpoint could not be read, detected or matched to a model."""

"""Errors of checkpoint loading and saving, shared by the trainer and the conversion tools."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that is corrupt, or that does not fit the model being trained."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint's files are missing, truncated or changed since they were saved."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code, or build objects a checkpoint never holds, when
    unpickled; it was not written by this code (or was altered afterwards)."""

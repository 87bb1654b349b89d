"""The library's error for checkpoints, in a module that imports nothing of l1ra (so that low modules can raise it)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model; the message names the file and the problem."""

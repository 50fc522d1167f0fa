"""The engine's own exceptions: each message names the problem and what would be valid."""


class XDiTError(Exception):
    """Base class of every error the engine raises on purpose."""


class XDiTConfigError(XDiTError):
    """An invalid setting (sizes, steps, sampler, degrees) found before any work starts."""


class XDiTModelError(XDiTError):
    """A model path, layout or weight file that cannot be loaded."""


class XDiTConditioningError(XDiTError):
    """Conditioning tensors with missing keys or wrong shapes."""


class XDiTWorkerError(XDiTError):
    """A failure inside a worker rank, carried to the host with its traceback."""


class XDiTCancelled(XDiTError):
    """Sampling stopped on request at a step boundary."""

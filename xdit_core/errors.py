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
    """A rank that failed, died or stopped answering; `details` keeps its traceback when it had one."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class XDiTNumericError(XDiTError):
    """NaN or inf where finite numbers are needed: inputs before work, the model's output at its first step."""


class XDiTCancelled(XDiTError):
    """Sampling stopped on request at a step boundary."""

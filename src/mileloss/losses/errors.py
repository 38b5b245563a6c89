"""Errors raised for bad loss inputs. All are ``ValueError`` so ``except ValueError`` keeps working."""


class LossInputError(ValueError):
    """Base class: an argument to a mileloss loss is unusable; the message names it."""


class ShapeError(LossInputError):
    """Tensor shapes do not fit together (logits vs targets, hidden vs weight, bias)."""


class DTypeError(LossInputError):
    """Integer logits, non-integer targets, or mismatched floating dtypes."""


class DeviceError(LossInputError):
    """Tensors live on different devices."""


class TargetRangeError(LossInputError):
    """A target outside [0, V) that is not ``ignore_index``."""


class ParameterError(LossInputError):
    """A scalar option out of range (negative gamma, unknown reduction, bad chunk size, ...)."""

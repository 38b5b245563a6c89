"""Errors raised for bad loss inputs. All are ``ValueError`` so ``except ValueError`` keeps working."""


class LossInputError(ValueError):
    """Base class: an argument to a mileloss loss is unusable; the message names it."""


class ShapeError(LossInputError):
    """Tensor shapes do not fit together (logits vs targets, hidden vs weight, bias), or a dimension is empty."""


class DTypeError(LossInputError):
    """Integer logits, non-integer targets, or mismatched floating dtypes."""


class NotATensorError(DTypeError, TypeError):
    """A tensor argument is something else (a numpy array, a list, None). Also a ``TypeError``."""


class DeviceError(LossInputError):
    """Tensors live on different devices."""


class TargetRangeError(LossInputError):
    """A target outside [0, V) that is not ``ignore_index``."""


class ParameterError(LossInputError):
    """A scalar option of the wrong type or out of range (gamma, sigma, reduction, chunk size, ...)."""


class WeightRangeError(ParameterError):
    """The token weights of an accumulated step lie outside what its fixed scale can represent in float32.

    Raised by ``WeightNormalizer`` when the largest weight of the step, relative to the fixed shift of the
    ``reduction="sum"`` outputs, is below 2^-64: the gradients summed over the micro-batches have then lost
    their precision (see the "Range of gamma and sigma" notes in ``mileloss.losses.functional``)."""

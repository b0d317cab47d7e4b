"""Exceptions raised by vpeft. Every message names the problem and how to fix it."""

from __future__ import annotations


class VPeftError(Exception):
    """Base class of every error vpeft raises on purpose."""


class UnknownMethodError(VPeftError, KeyError):
    """The method name is not registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


class ConfigError(VPeftError, ValueError):
    """An option is unknown or has a value of the wrong type or range."""


class UnsupportedBackboneError(VPeftError, TypeError):
    """The backbone's architecture is unknown, or the method cannot apply to it."""


class AdapterMismatchError(VPeftError, ValueError):
    """A saved adapter does not fit the model it is being loaded into."""


class NotMergeableError(VPeftError, RuntimeError):
    """The method's update cannot be folded into the backbone's weights."""

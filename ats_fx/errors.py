"""Errors raised by ats_fx. Each message says what was wrong and how to fix it."""
from __future__ import annotations


class ATSError(Exception):
    """Base class of every error ats_fx raises on purpose."""


class ATSConfigError(ATSError, ValueError):
    """A bad option: stage out of range, ratio outside (0, 1], k < 1, unknown key."""


class ATSUnsupportedModel(ATSError):
    """The model cannot be converted; the message names the layer and the reason."""


class ATSInputError(ATSError, ValueError):
    """A bad input at run time: wrong shape, NaN or inf."""

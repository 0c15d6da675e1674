"""The methods the engine runs, one file each, found through a registry.

A method is a :class:`~dleaf.methods.base.Method` subclass (what it does) and a frozen config dataclass (its knobs,
validated on construction), registered under a name with :func:`~dleaf.methods.base.register` in its own module of
this package. Every module here is imported on the first lookup, so adding a method is adding one file: the engine
finds it from the config class (:func:`method_for`), :func:`dleaf.config.method_config` by name, and the listings
(``python -m dleaf methods``, help texts) from :func:`describe`.
"""

from __future__ import annotations

from .base import (Method, MethodConfig, Registration, describe, method_for, method_names, registration,
                   registrations, register)

__all__ = ["Method", "MethodConfig", "Registration", "describe", "method_for", "method_names", "registration",
           "registrations", "register"]

"""Decoding methods, found by name through the registry."""

from . import ar, rsd_c, rsd_s, sd, spectr  # noqa: F401  (registers the built-in methods)
from .registry import Method, available_methods, get_method, register

__all__ = ["Method", "available_methods", "get_method", "register"]

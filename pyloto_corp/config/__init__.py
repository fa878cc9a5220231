"""Configuration: the environment parsed into one frozen :class:`Settings` object."""

from __future__ import annotations

from .settings import Settings, Var

__all__ = ["Settings", "Var"]

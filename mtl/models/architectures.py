"""Every built-in multitask architecture, registered in ``ARCHS`` by importing this module."""

from mtl.models import columns, experts  # noqa: F401  (importing registers them)
from mtl.models.arch import ARCHS, Architecture, arch_names

__all__ = ["ARCHS", "Architecture", "arch_names"]

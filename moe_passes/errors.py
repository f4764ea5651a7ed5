"""Errors the project raises at its boundaries (never a bare assert)."""

from __future__ import annotations

__all__ = ["MoEError", "MoEConfigError", "MoEShapeError", "KernelUnavailableError"]


class MoEError(Exception):
    """Base class of every moe_nvfp4 error."""


class MoEConfigError(MoEError, ValueError):
    """A layer, kernel or option was configured with values that cannot work."""


class MoEShapeError(MoEError, ValueError):
    """Tensors whose shapes break the MoE shape contract, found at compile time.

    ``layer`` names the MoE layer, ``sizes`` the sizes that met (e.g. padded 2816 and unpadded 2688),
    ``source`` the user's source line when the graph recorded one.
    """

    def __init__(self, message: str, *, layer: str | None = None, sizes: tuple | None = None,
                 source: str | None = None):
        self.layer, self.sizes, self.source = layer, sizes, source
        parts = [message]
        if layer:
            parts.append(f"  layer: {layer}")
        if source:
            parts.append("  user code:\n" + "\n".join("    " + line for line in source.strip().splitlines()))
        super().__init__("\n".join(parts))


class KernelUnavailableError(MoEError, RuntimeError):
    """The selected kernel cannot run here (device, package or capability missing)."""

"""Errors the project raises at its boundaries (never a bare assert)."""

from __future__ import annotations

__all__ = ["MoEError", "MoEConfigError", "MoEShapeError", "MoENonFiniteError", "KernelUnavailableError",
           "MoERangeWarning"]


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
        # No base-class __init__ call and the text composed in __str__: Dynamo can then trace this
        # constructor (it cannot trace super().__init__ here), so a raise in traced code keeps its message.
        # ``args`` stays ``(message,)``, set by BaseException.__new__.
        self.message, self.layer, self.sizes, self.source = message, layer, sizes, source

    def __str__(self) -> str:
        parts = [self.message]
        if self.layer:
            parts.append(f"  layer: {self.layer}")
        if self.source:
            parts.append("  user code:\n" + "\n".join("    " + line for line in self.source.strip().splitlines()))
        return "\n".join(parts)


class KernelUnavailableError(MoEError, RuntimeError):
    """The selected kernel cannot run here (device, package or capability missing)."""


class MoENonFiniteError(MoEError, ValueError):
    """Activations holding NaN or inf reached a kernel that quantizes them to NVFP4 (which has neither).

    Raised where a check costs nothing extra (the reference kernel, which syncs anyway); the GPU kernels
    never read their inputs back to the host for it.
    """


class MoERangeWarning(UserWarning):
    """Activations beyond a layer's calibrated range: NVFP4 block scales saturate and those values clip."""

"""Where tensors live and in which precision, when the caller has not said."""

from __future__ import annotations

import torch

#: Fields are float32 by default: half the memory traffic of float64, and the model's own error
#: (splitting, discretisation) is far above float32 rounding.
DEFAULT_DTYPE: torch.dtype = torch.float32


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a device setting into a ``torch.device``.

    ``"auto"`` picks ``cuda`` when a CUDA device is usable, else ``cpu``; any other value is
    passed to ``torch.device`` unchanged (``"cpu"``, ``"cuda:1"``, ...). Asking for CUDA on a
    machine without it is an error rather than a silent fallback, so a misconfigured worker is
    noticed.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    return device

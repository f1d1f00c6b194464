"""Finite numbers only: a NaN or inf is reported where it is first seen, naming the tensor and its origin.

Checked: a model's parameters and buffers when it is loaded and before it is saved, every
training loss (the run stops at the first non-finite one), sampled images, verification
outputs, and an artifact's timestep constants when it is opened.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from dgo_compile.core.errors import DgoError


class NonFiniteError(DgoError):
    """A tensor holds NaN or inf values; the message names it and where it came from."""


def count_nonfinite(value) -> tuple[int, int]:
    """(NaN count, inf count) of a tensor or numpy array; (0, 0) for integer types."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            return 0, 0
        return int(np.isnan(value).sum()), int(np.isinf(value).sum())
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
        return 0, 0
    if value.device.type == "meta":
        return 0, 0
    if bool(torch.isfinite(value).all()):  # one pass in the common case
        return 0, 0
    return int(torch.isnan(value).sum()), int(torch.isinf(value).sum())


def describe(nans: int, infs: int) -> str:
    parts = [f"{nans} NaN value{'s' * (nans != 1)}"] * bool(nans) + [f"{infs} infinite value{'s' * (infs != 1)}"] * \
        bool(infs)
    return " and ".join(parts)


def check_finite(value, what: str, hint: str = "", field: str | None = None) -> None:
    """Raise NonFiniteError when `value` (a tensor, an array, a module, or a mapping of them) holds
    NaN or inf. `what` names it ("the sampled images of artifact A"); mapping keys and parameter
    names are added ("parameter conv_in.weight of model M has 3 NaN values"). `field`: the setting the
    hint names, in backticks (see DgoError)."""
    if isinstance(value, torch.nn.Module):
        value = {**dict(value.named_parameters()), **dict(value.named_buffers())}
        kind = "parameter"
    else:
        kind = "tensor"
    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    bad = [(key, count_nonfinite(tensor)) for key, tensor in items]
    bad = [(key, counts) for key, counts in bad if any(counts)]
    if not bad:
        return
    key, counts = bad[0]
    subject = what if key is None else f"{kind} {key} of {what}"
    more = f" (and {len(bad) - 1} more tensor{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
    raise NonFiniteError(f"{subject} has {describe(*counts)}{more}" + (f"; {hint}" if hint else ""), field=field)

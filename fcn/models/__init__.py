"""Model registry: ``build_model(name, *, num_classes, **kwargs)`` and the list of names.

Every model obeys one contract: ``model(x)`` maps ``(N, 3, H, W)`` to logits ``(N, C, H, W)`` at the input
size; ``model(x, return_features=True)`` returns ``{"out", "c3", "c4", "c5"}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from fcn.models.errors import ModelError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder (keyword-only arguments, ``num_classes`` required) to the registry."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model; unknown names and arguments raise :class:`ModelError` with the fix."""
    try:
        builder = _REGISTRY[name]
    except KeyError as err:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from err
    params = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ModelError(f"model {name!r} takes no argument(s) {unknown}; it takes {sorted(params)}")
    if "num_classes" not in kwargs:
        raise ModelError(f"model {name!r} needs num_classes=<int>")
    n = kwargs["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelError(f"num_classes must be a positive int, got {n!r}")
    return builder(**kwargs)


# Register the builders (imported for their side effect).
from fcn.models import builders as _builders  # noqa: E402,F401

__all__ = ["ModelError", "build_model", "list_models", "register_model"]

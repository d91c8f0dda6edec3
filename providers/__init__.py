"""Gateway adapters. The registry maps a provider id to its class, imported lazily (as
django-payments does) so a worker only loads the gateways it uses.

Adding a gateway: its module, one line here, its sandbox router, its tests (ADDING_A_GATEWAY.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from providers.base import Provider

REGISTRY: dict[str, str] = {
    "vai247": "providers.vai247:Vai247Provider",
    "bbmsl": "providers.bbmsl:BbmslProvider",
    "vaultspay": "providers.vaultspay:VaultspayProvider",
    "pgv2": "providers.pgv2:Pgv2Provider",
}


def provider_ids() -> list[str]:
    """Every provider id refundq knows, configured or not."""
    return sorted(REGISTRY)


def provider_class(provider_id: str) -> type[Provider]:
    """The class for `provider_id`; `KeyError` naming the known ids if there is none."""
    try:
        target = REGISTRY[provider_id]
    except KeyError:
        raise KeyError(
            f"unknown provider {provider_id!r}; known: {', '.join(provider_ids())}"
        ) from None
    module_name, _, class_name = target.partition(":")
    provider: type[Provider] = getattr(importlib.import_module(module_name), class_name)
    return provider

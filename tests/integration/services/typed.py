"""Handlers of every parameter kind the gateway validates (for the OpenAPI fuzz test): their
schemas come from these type hints, and each answer is cheap whatever the input."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import steadyserve


class Item(TypedDict):
    sku: str
    quantity: int
    price: float
    note: NotRequired[str | None]


class Typed(steadyserve.Service):
    @steadyserve.handler
    def scalars(self, text: str, count: int, ratio: float, flag: bool = False) -> dict[str, Any]:
        return {"len": len(text), "count": count, "ratio": ratio, "flag": flag}

    @steadyserve.handler
    def shapes(self, tags: list[str], meta: dict[str, Any], maybe: int | None = None,
               anything: Any = None) -> dict[str, Any]:
        return {"tags": len(tags), "keys": len(meta), "maybe": maybe}

    @steadyserve.handler
    def order(self, items: list[Item], coupon: str | None = None) -> dict[str, Any]:
        if not items:
            raise steadyserve.ClientError("an order needs items", param="items")
        total = sum(i["quantity"] * i["price"] for i in items)
        return {"items": len(items), "total": total if total == total else None}

    @steadyserve.handler(batch=True, max_batch_size=16, max_inputs=64)
    def lengths(self, texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

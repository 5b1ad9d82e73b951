"""WooCommerce-shaped orders with taxes, as the REST API returns them (tax per line, rounded per
line as WooCommerce does by default), for the real-ERP tests and the benchmark."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

RATES = {"": Decimal("0.19"), "reduced-rate": Decimal("0.07")}
CENT = Decimal("0.01")


def _money(d: Decimal) -> str:
    return str(d.quantize(CENT, ROUND_HALF_UP))


def taxed_order(
    number: int,
    *,
    lines: int = 3,
    email: str | None = None,
    reduced: bool = False,
    shipping_total: str = "4.90",
    **overrides: Any,
) -> dict[str, Any]:
    """An order of ``lines`` lines (SKUs X-1..X-20, prices with cents) plus ``BOOK-1`` at the
    reduced rate when ``reduced``; ``email=""`` makes a guest order."""
    items: list[dict[str, Any]] = []
    specs = [(f"X-{(number + i) % 20 + 1}", "") for i in range(lines)]
    if reduced:
        specs.append(("BOOK-1", "reduced-rate"))
    for i, (sku, tax_class) in enumerate(specs):
        qty = i % 3 + 1
        price = Decimal(f"{(number * 7 + i * 13) % 5000 / 100 + 0.99:.2f}")
        total = (price * qty).quantize(CENT)
        tax = (total * RATES[tax_class]).quantize(CENT, ROUND_HALF_UP)
        items.append(
            {
                "id": number * 100 + i,
                "name": f"Item {sku}",
                "sku": sku,
                "quantity": qty,
                "price": str(price),
                "subtotal": _money(total),
                "total": _money(total),
                "total_tax": _money(tax),
                "tax_class": tax_class,
            }
        )
    ship = Decimal(shipping_total)
    ship_tax = (ship * RATES[""]).quantize(CENT, ROUND_HALF_UP)
    net = sum((Decimal(i["total"]) for i in items), Decimal(0)) + ship
    tax_total = sum((Decimal(i["total_tax"]) for i in items), Decimal(0)) + ship_tax
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    address = {
        "first_name": "Anna",
        "last_name": f"Kunde{number}",
        "company": "",
        "address_1": "Hauptstr. 1",
        "address_2": "",
        "city": "Berlin",
        "postcode": "10115",
        "country": "DE",
    }
    order: dict[str, Any] = {
        "id": number,
        "number": str(number),
        "status": "processing",
        "currency": "EUR",
        "date_created": now,
        "date_modified": now,
        "date_paid": now,
        "total": _money(net + tax_total),
        "total_tax": _money(tax_total),
        "shipping_total": _money(ship),
        "shipping_tax": _money(ship_tax),
        "customer_id": 0,
        "customer_note": "",
        "payment_method": "paypal",
        "billing": {
            **address,
            "email": f"kunde{number}@example.com" if email is None else email,
        },
        "shipping": {**address, "address_1": "Lieferweg 2"},
        "shipping_lines": [
            {
                "id": number * 100 + 99,
                "method_id": "flat_rate",
                "method_title": "Flat rate",
                "total": _money(ship),
                "total_tax": _money(ship_tax),
            }
        ],
        "line_items": items,
    }
    order.update(overrides)
    return order

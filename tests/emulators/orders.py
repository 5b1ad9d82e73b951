"""Seeded generators of realistic, shop-neutral sample orders and products.

Each emulator renders a :class:`SampleOrder` in its own API's JSON shape, so one generated data set
can be loaded into every emulator and the contract tests compare like with like.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

_FIRST = ["Anna", "Mads", "Sofie", "Lars", "Ida", "Jonas", "Freja", "Emil", "Clara", "Noah", "Zoë"]
_LAST = ["Jensen", "Nielsen", "Hansen", "Pedersen", "Andersen", "Christensen", "Larsen", "Sørensen"]
_CITIES = [("København K", "1050"), ("Aarhus C", "8000"), ("Odense C", "5000"), ("Aalborg", "9000")]
_STREETS = ["Nørregade", "Vestergade", "Strandvejen", "Algade", "Bredgade", "Østergade"]
_ITEMS = ["Coffee mug", "Tea pot", "Linen towel", "Oak board", "Wool blanket", "Candle holder"]
_PAYMENTS = [("stripe", "Credit card"), ("mobilepay", "MobilePay"), ("bacs", "Bank transfer")]


@dataclass(frozen=True, slots=True)
class SampleLine:
    sku: str
    name: str
    quantity: int
    price: Decimal  # unit price excluding tax


@dataclass(frozen=True, slots=True)
class SampleOrder:
    """One order, independent of any shop's JSON shape. ``number`` is the e-number."""

    number: int
    status: str
    created: datetime
    modified: datetime
    currency: str
    first_name: str
    last_name: str
    email: str
    street: str
    city: str
    postcode: str
    country: str
    phone: str
    payment_method: str
    payment_title: str
    paid: datetime | None
    lines: tuple[SampleLine, ...]
    shipping: Decimal
    tax_rate: Decimal = Decimal("0.25")
    customer_note: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def subtotal(self) -> Decimal:
        return sum((ln.price * ln.quantity for ln in self.lines), Decimal("0"))

    @property
    def tax(self) -> Decimal:
        return ((self.subtotal + self.shipping) * self.tax_rate).quantize(Decimal("0.01"))

    @property
    def total(self) -> Decimal:
        return self.subtotal + self.shipping + self.tax


def sample_skus(n: int = 40) -> list[str]:
    return [f"SKU-{i:05d}" for i in range(1, n + 1)]


def generate_orders(
    n: int,
    *,
    seed: int = 1,
    start: datetime = datetime(2026, 11, 1, 8, 0, tzinfo=UTC),
    spacing: timedelta = timedelta(minutes=7),
    first_number: int = 1001,
    skus: list[str] | None = None,
) -> list[SampleOrder]:
    """``n`` orders, created ``spacing`` apart from ``start``; modified a little after creation."""
    rng = random.Random(seed)
    skus = skus or sample_skus()
    out = []
    for i in range(n):
        created = start + spacing * i
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        city, postcode = rng.choice(_CITIES)
        method, title = rng.choice(_PAYMENTS)
        lines = tuple(
            SampleLine(
                sku=sku,
                name=f"{rng.choice(_ITEMS)} {sku[-3:]}",
                quantity=rng.randint(1, 4),
                price=Decimal(rng.randint(500, 40000)) / 100,
            )
            for sku in rng.sample(skus, rng.randint(1, 4))
        )
        out.append(
            SampleOrder(
                number=first_number + i,
                status=rng.choice(["processing", "processing", "processing", "on-hold"]),
                created=created,
                modified=created + timedelta(seconds=rng.randint(1, 120)),
                currency="DKK",
                first_name=first,
                last_name=last,
                email=f"{first.lower()}.{last.lower()}@example.com",
                street=f"{rng.choice(_STREETS)} {rng.randint(1, 120)}",
                city=city,
                postcode=postcode,
                country="DK",
                phone=f"+45 {rng.randint(20000000, 99999999)}",
                payment_method=method,
                payment_title=title,
                paid=created + timedelta(seconds=30) if method != "bacs" else None,
                lines=lines,
                shipping=Decimal(rng.choice([0, 39, 49])),
            )
        )
    return out


def modified(order: SampleOrder, at: datetime, **changes: object) -> SampleOrder:
    """A copy of ``order`` modified at ``at`` (UTC) with ``changes`` applied (e.g. status)."""
    return replace(order, modified=at, **changes)  # type: ignore[arg-type]


def generate_products(
    skus: list[str] | None = None, *, seed: int = 1
) -> list[tuple[str, str, int]]:
    """(sku, name, stock quantity) for each SKU."""
    rng = random.Random(seed)
    return [
        (sku, f"{rng.choice(_ITEMS)} {sku[-3:]}", rng.randint(0, 50))
        for sku in skus or sample_skus()
    ]

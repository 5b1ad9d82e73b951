"""ERP → webshop pushers: stock levels (:mod:`replicator.push.stock`), booked invoices
(:mod:`replicator.push.invoices`), the ERP-side webhook (:mod:`replicator.push.erp_webhook`) and
the per-shop token bucket (:mod:`replicator.push.ratelimit`).

Each pusher reads the staging store's change journal with its own cursor and moves it only when
what the entries stand for is safely done (accepted by the shop, or durably queued); see the
module docstrings for the wiring into the daemon loop.
"""

"""The Manage page: a web view of orders, updates, logs, services and replication.

Served by the daemon's HTTP server (:mod:`replicator.web.server`); see :mod:`replicator.web.app`
for the routes and wiring, and :mod:`replicator.web.lag` for the lag history the replication
chart draws. Import from those modules: this package imports nothing, so the read model
(:mod:`replicator.ops.readmodel`) can use a formatting helper of :mod:`replicator.web.lag`
without pulling in the page.
"""

"""The Manage page: a web view of orders, updates, logs, services and replication.

Served by the daemon's health server; see :mod:`replicator.web.app` for the routes and wiring,
and :mod:`replicator.web.lag` for the lag history the replication chart draws.
"""

from replicator.web.app import ManageApp, WebContext, mount
from replicator.web.lag import purge_lag_history, record_lag_sample

__all__ = ["ManageApp", "WebContext", "mount", "purge_lag_history", "record_lag_sample"]

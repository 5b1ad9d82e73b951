"""Operations: what ``status``, the Manage page, ``/metrics`` and ``/readyz`` read.

Nothing here writes to the ERP or the staging store. :mod:`replicator.ops.readmodel` holds the
queries (shared by the status CLI, the Manage page and the metrics collector),
:mod:`replicator.ops.checks` the named readiness checks, and :mod:`replicator.ops.gauges` turns
what the daemon knows into Prometheus gauges.
"""

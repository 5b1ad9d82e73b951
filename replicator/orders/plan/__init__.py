"""The parts :class:`replicator.orders.plan_writer.PlanWriter` coordinates to write one order with
a plan mapping (:mod:`replicator.mappers.plan`) into an ERP's own tables.

``erp_sql`` (the dialect: quoting, bound values), ``lookups`` (master data read from the ERP and
its cache), ``numbering`` (the ERP's document numbers and keys taken beforehand), ``expressions``
(what a plan's expressions see and call, and their failures as rejected orders), ``rows`` (rows
and order lines written or matched), ``customer`` (find or create the order's customer),
``link`` (sync-daemon's link table: e-number to ERP order), ``existing`` (what is done to an
order already in the ERP: posted?, replace, cancel).
"""

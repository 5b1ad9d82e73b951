"""Order import: webshop orders into the ERP, once per e-number, every order's fate in a ledger.

``inbox`` (one inbox keyed by shop + e-number), ``ledger`` (staging tables ``order_*``),
``mappings`` (load, validate, hot-reload), ``polling`` (windows, watermarks, failure counts),
``decision`` (the fate of one order, a pure function), ``writer`` / ``plan_writer`` (ERP
write-once; a plan's parts — SQL, look-ups, numbering, customer, rows, link table, orders
already in the ERP — in the ``plan`` package), ``actions`` (operator actions, the updates queue), ``coordinator`` (the cycle, the
worker pool and webhook wake-ups: :class:`OrderImportService`), ``gaps``.
"""

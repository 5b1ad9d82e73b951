"""Order import: webshop orders into the ERP, once per e-number, every order's fate in a ledger.

``inbox`` (one inbox keyed by shop + e-number), ``ledger`` (staging tables ``order_*``),
``writer`` (ERP write-once), ``importer`` (the cycle, :class:`OrderImportService`), ``gaps``.
"""

"""Webshop connectors: where orders come from (REST polling, webhooks, an inbox folder) and where
stock levels and invoices go to."""

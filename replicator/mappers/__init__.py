"""Mappers: webshop orders to ERP rows, and ERP changes to webshop updates."""

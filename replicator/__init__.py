"""sync-daemon: change-data-capture from an ERP database into a staging store, and the webshop bridge."""

__version__ = "0.1.0"

"""Thin entry point: ``python sync_daemon.py`` behaves exactly like the ``sync-daemon`` script."""

from replicator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

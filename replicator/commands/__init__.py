"""CLI subcommands contributed by feature areas.

Every module in this package exposes ``register(subparsers) -> None``; ``replicator.cli`` imports
them all, so a feature adds its commands without touching the core CLI module.
"""

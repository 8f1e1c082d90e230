"""Shipped run configurations: ``ptqcal run --config NAME`` or ``--config FILE.toml``."""

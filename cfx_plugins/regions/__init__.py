"""Built-in region sources for ``--region``."""

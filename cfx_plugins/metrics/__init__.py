"""Built-in metrics for ``cfx eval``."""

"""Built-in classifier adapters (classifier spec schemes)."""

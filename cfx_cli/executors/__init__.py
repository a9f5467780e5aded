"""Where batches run: in this process (default) or on a Ray cluster (``--executor ray``)."""

"""The built-in plugins of cfx, registered through the ``cfx`` entry-point group like any other."""

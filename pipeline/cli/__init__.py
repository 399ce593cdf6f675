"""The ``recede`` command line."""

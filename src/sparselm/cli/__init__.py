"""The ``sparselm`` command line."""

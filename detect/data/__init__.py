"""data layer of detect (see detect/__init__.py for the layer order)."""

"""Installation helpers. ``install_detectron2.py`` also runs as a plain script (``make setup`` calls it
before anything else is installed)."""

"""The demo: predictions drawn with Detectron2's Visualizer (``python -m projects.demo.demo``)."""

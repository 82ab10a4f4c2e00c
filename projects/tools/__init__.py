"""Small utilities: ``python -m projects.tools.plot_metrics`` (training curves from metrics.json)."""

"""Deployment tools: ``python -m projects.deploy.export`` (the network to ONNX, for onnxruntime)."""

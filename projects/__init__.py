"""Runnable tools built on the package, never imported by it. Each tool is a module run from the
repository root as ``python -m projects.<group>.<tool>`` (``benchmarks``, ``convert``, ``demo``, ``deploy``,
``tools``); all of them set up their config with :func:`panoptic_segformer.config.setup_cfg`."""

"""One-off checks against other implementations (they need environments built by hand; never run by tests or CI)."""

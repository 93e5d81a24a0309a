"""Integrations with model libraries (imported on demand; no hard dependency)."""

"""Helpers for the test-suite (multi-process launch, tiny configs)."""

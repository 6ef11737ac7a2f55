"""Tiny models and data files for tests (torch-uncertainty style dummies)."""

"""The package version, kept equal to pyproject.toml's (tests/test_layout.py checks)."""

__version__ = "0.1.0"

"""The package version (one place; the package face and run records read it)."""

__version__ = "0.1.0"

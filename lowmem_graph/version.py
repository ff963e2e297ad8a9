"""The package's version, importable without the package's lazy names (predict.py, cli.py)."""
__version__ = "0.1.0"

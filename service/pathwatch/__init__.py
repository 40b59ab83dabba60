"""pathwatch: alerts when a Kubernetes process runs from an executable path not seen before."""

__version__ = "0.1.0"

__all__ = ["__version__"]

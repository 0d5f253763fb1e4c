"""streamrec: a streaming personalization pipeline on Kafka (the library; the loops live in workers/)."""

__version__ = "0.1.0"

__all__ = ["__version__"]

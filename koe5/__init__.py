"""koe5: declarative training of Korean text-embedding models."""

__version__ = "0.1.0"

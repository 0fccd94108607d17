"""xmag: read whole-slide images at 5x and run distilled tile encoders on them."""

__version__ = "0.1.0"

"""capfilt: BLIP-style CapFilt (caption + filter) for web-scale image-text data."""

__version__ = "0.1.0"

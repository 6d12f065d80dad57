"""Crosscoder Atlas: static feature atlases for crosscoders and sparse autoencoders."""

__version__ = "0.1.0"

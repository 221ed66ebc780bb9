"""jaxattr: fast data attribution on images in JAX (Singla et al. 2023 baseline)."""

__version__ = "0.1.0"

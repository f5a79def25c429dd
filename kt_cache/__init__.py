"""kt_cache: run many pretrained teachers once over an image dataset and store their outputs in Zarr v3.

The package is importable without torch; heavy imports happen inside the functions that need them.
"""

__version__ = "0.1.0"

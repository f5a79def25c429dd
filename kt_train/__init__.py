"""kt_train: train students from a ktc teacher cache (reads stores through ``kt_cache.store``)."""

__version__ = "0.1.0"

"""kt_cache: run many pretrained teachers once over an image dataset and store their outputs in Zarr v3.

The package is importable without torch; heavy imports happen inside the functions that need them.
"""

__version__ = "0.1.0"


def open_datatree(store):  # noqa: ANN001, ANN201 - the signature lives in kt_cache.xarray_view
    """The store (path or URL) as an ``xarray.DataTree``: sample ids, views and class names as coordinates
    (``kt_cache.xarray_view``)."""
    from kt_cache.xarray_view import open_datatree as open_tree

    return open_tree(store)

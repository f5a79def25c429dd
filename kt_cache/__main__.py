"""``python -m kt_cache`` is ``ktc``."""

from kt_cache.cli import main

main()

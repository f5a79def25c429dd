"""Helpers of ``benchmarks/digits_zoo.py``: data, teacher zoo, extraction, student runs, report."""

"""The benchmark: one module per section (see run.py), run as `python bench/run.py`."""

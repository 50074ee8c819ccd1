"""RELIABILITY.md: run the fault matrix, the soak and (when present) the fuzz tests, and write the figures.

`python -m reliability` is the one command; see `reliability/__main__.py` for its options.
"""

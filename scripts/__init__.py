"""Entry points above the training side: serving, export, evaluation, benchmarks (run as `python scripts/X.py`)."""

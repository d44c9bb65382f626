"""`python -m demo`: the demo runner (demo/run.py)."""

from .run import main

main()

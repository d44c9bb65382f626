"""The demo: a synthetic curriculum for every stage (curriculum.py, its files in data/), the held-out metrics that
show what each stage taught (metrics.py), the runner that trains the whole pipeline on CPU in minutes (run.py:
`python -m demo`), and the demo model's weather tool (tools.py). It sits on top of every other package."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"  # the generated curriculum, tracked in git

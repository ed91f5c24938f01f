"""python -m experiments.cars196 --config=experiments/configs/cars196.py --workdir=DIR

Trains and evaluates (method.md §2–4); the command line is experiments/main.py's.
"""

from __future__ import annotations

from experiments import main

if __name__ == "__main__":
    main.run("cars196")

"""Command-line entry points behind ``python -m nst_exp``: run (Hydra), compare, evaluate, and the override checks."""

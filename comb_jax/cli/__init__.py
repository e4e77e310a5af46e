"""The command-line entry points, above every other layer: each parses its arguments, calls the layers below
and exits (`train.py`, `serve.py`, `python -m comb_jax.export`, `python -m comb_jax.shipped`).

Nothing imports this package but the entry scripts. Usage errors are one line with status 2 (`errors.run`).
"""

"""`python -m comb_jax.eval ...`: the side-by-side harness of `harness.py`."""

from comb_jax.eval.harness import main

main()

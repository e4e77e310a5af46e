"""`python -m comb_jax.shipped`: the ship command line (comb_jax/cli/ship.py); the registry is
`comb_jax.weights.shipped`."""

from comb_jax.cli.ship import main

if __name__ == "__main__":
    main()

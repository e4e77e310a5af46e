"""The named configs: each module defines `config() -> Config` and is chosen by name (`--config NAME`).

They ship inside the package, so an installed wheel can load the shipped model's config. `comb_jax.config`
finds them here and runs them by file; nothing imports this package.
"""

"""comb-jax: Comb position-independent caching for LLM serving, in JAX."""

__version__ = "0.1.0"

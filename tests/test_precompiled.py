"""serving.precompiled: executables compiled ahead of time run later calls of their shapes; other calls fall back."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.model.compiles import compile_count
from comb_jax.serving.precompiled import Precompiled


@Precompiled
@partial(jax.jit, static_argnames=("scale",), donate_argnames=("state",))
def step(params, state, x, *, scale: float):
    """A donated state, an optional (None) argument inside the tree, a static argument."""
    w = params["w"] if params["bias"] is None else params["w"] + params["bias"]
    return state + scale * (x @ w), (x @ w).sum(-1)


def test_compiled_ahead_runs_later_calls_without_compiling_and_equals_the_jit():
    params = {"w": jnp.arange(12.0).reshape(3, 4) / 7, "bias": None}
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    shapes = step.compile(params, jnp.zeros((2, 4)), jax.ShapeDtypeStruct((2, 3), jnp.float32), scale=2.0)
    want = jax.eval_shape(partial(step.jitted, scale=2.0), params, jnp.zeros((2, 4)), x)
    assert [(s.shape, s.dtype) for s in jax.tree.leaves(shapes)] == [(s.shape, s.dtype)
                                                                     for s in jax.tree.leaves(want)]
    state, state_again = jnp.ones((2, 4)), jnp.ones((2, 4))  # each call donates its own
    before = compile_count()
    got = step(params, state, x, scale=2.0)  # the executable: nothing compiles
    assert compile_count() == before
    reference = step.jitted(params, state_again, x, scale=2.0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_other_shapes_static_values_or_trees_fall_back_to_the_jit():
    params = {"w": jnp.ones((3, 4)), "bias": None}
    step.compile(params, jnp.zeros((2, 4)), jnp.zeros((2, 3)), scale=1.0)
    x5 = np.ones((5, 3), np.float32)
    out, _ = step(params, jnp.zeros((5, 4)), x5, scale=1.0)  # another batch: the jit compiles it
    np.testing.assert_allclose(np.asarray(out), np.full((5, 4), 3.0))
    out, _ = step(params, jnp.zeros((2, 4)), np.ones((2, 3), np.float32), scale=3.0)  # another static value
    np.testing.assert_allclose(np.asarray(out), np.full((2, 4), 9.0))
    with_bias = {"w": jnp.ones((3, 4)), "bias": jnp.ones((3, 4))}  # another tree (None became an array)
    out, _ = step(with_bias, jnp.zeros((2, 4)), np.ones((2, 3), np.float32), scale=1.0)
    np.testing.assert_allclose(np.asarray(out), np.full((2, 4), 6.0))

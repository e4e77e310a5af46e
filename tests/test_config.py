"""Named configs, overrides, clear errors, and the Llama-3.1-8B parameter counts from abstract shapes."""

import pytest

from comb_jax.config import ConfigError, available_configs, load_config
from comb_jax.model.layout import abstract_params, count_params, model_layout


def test_named_configs_exist():
    assert {"tiny_comb", "smollm2_comb", "llama8b_comb"} <= set(available_configs())


def test_cross_layer_positions():
    assert load_config("llama8b_comb").model.cross_layers == (3, 7, 11, 15, 19, 23, 27, 31)
    assert load_config("smollm2_comb").model.cross_layers == (4, 9, 14, 19, 24, 29)


def test_unknown_config_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown config 'nope'.*llama8b_comb.*smollm2_comb.*tiny_comb"):
        load_config("nope")


def test_overrides_dotted_bare_and_typed():
    cfg = load_config("tiny_comb", ["train.learning_rate=1e-4", "steps=7", "weights.source=hf",
                                    "train.chunk_buckets=[8, 16]", "train.remat=false"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.steps == 7 and cfg.weights.source == "hf"
    assert cfg.train.chunk_buckets == (8, 16) and cfg.train.remat is False


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "unknown config key 'train.nope'; valid keys: .*train.learning_rate"),
    ("chunk_buckets=(8,)", "ambiguous config key 'chunk_buckets': .*train.chunk_buckets, serve.chunk_buckets"),
    ("steps=abc", "steps: cannot parse 'abc' as int"),
    ("seed", "is not key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_comb", [override])


def test_invalid_model_shape_is_rejected():
    with pytest.raises(ValueError, match="multiple of num_cross_layers"):
        load_config("tiny_comb", ["model.num_cross_layers=3"])


def test_llama8b_parameter_counts_from_abstract_shapes():
    layout = model_layout(load_config("llama8b_comb").model)
    shapes = abstract_params(layout)  # ShapeDtypeStructs: nothing is allocated
    assert count_params(shapes["comb"]) == 3_489_794_064
    assert count_params(shapes["backbone"]) == 8_030_261_248
    assert count_params(shapes["comb"]["cross"]) == 1_677_789_200
    assert count_params(shapes["comb"]["encoder"]["layers"]) == 1_744_896_000
    enc = shapes["comb"]["encoder"]
    assert count_params(enc["k_proj"]) + count_params(enc["v_proj"]) == 67_108_864


def test_compute_dtype_auto_is_float32_on_cpu_and_bad_names_are_rejected():
    assert load_config("smollm2_comb").compute_dtype == "float32"  # these tests run on the CPU backend
    assert load_config("llama8b_comb").compute_dtype == "bfloat16"  # named explicitly in its config
    assert load_config("tiny_comb", ["compute_dtype=bfloat16"]).compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="compute_dtype='fp8'; valid: auto, float32, bfloat16"):
        load_config("tiny_comb", ["compute_dtype=fp8"])

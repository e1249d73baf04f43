"""The param table, the schedule, and the optimizer built from a config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import launch
from jaxrun import model, optim


def _labelled(name):
    cfg = launch.load_config(name)
    params = jax.eval_shape(lambda key: model.init(key, cfg.model), jax.random.key(0))
    return cfg, params, optim.param_labels(params)


@pytest.mark.parametrize("name", ["simple", "gpt2_llmc", "demo"])
def test_every_leaf_gets_exactly_one_label(name):
    _, params, labels = _labelled(name)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert len(jax.tree.leaves(labels)) == len(leaves)
    assert set(jax.tree.leaves(labels)) <= set(optim.GROUPS)
    for path, _ in leaves:  # label_of raises unless exactly one row matches
        optim.label_of(optim.path_str(path))


def test_simple_groups_match_the_recipe():
    _, params, labels = _labelled("simple")
    flat = {optim.path_str(p): label for p, label in jax.tree_util.tree_leaves_with_path(labels)}
    assert flat["embed/tokens"] == "embed" and flat["lm_head/w"] == "head" and flat["lm_head/b"] == "scalar"
    hidden = {p for p, label in flat.items() if label == "hidden"}
    assert hidden == {f"blocks/attn/w_{n}" for n in "qkvo"} | {"blocks/mlp/w_up", "blocks/mlp/w_down"}
    shapes = {optim.path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for path in hidden:  # Muon leaves: a stack of L matrices, each [fan_in, fan_out]
        assert len(shapes[path]) == 3 and shapes[path][0] == 12 and min(shapes[path][1:]) >= 768


def test_rank_alone_would_mislabel():
    """embed and lm_head are matrices too; the table, not ndim, keeps them on Adam."""
    _, params, labels = _labelled("simple")
    assert params["embed"]["tokens"].ndim == 2 and labels["embed"]["tokens"] == "embed"
    assert params["lm_head"]["w"].ndim == 2 and labels["lm_head"]["w"] == "head"


def test_unknown_param_is_refused():
    with pytest.raises(ValueError, match="matches 0 rows"):
        optim.label_of("blocks/attn/mystery")


def test_schedules():
    simple, llmc = launch.load_config("simple"), launch.load_config("gpt2_llmc")
    eta = optim.lr_factor(simple.optim, 3250)
    # constant for the first 30%, then linear to zero (train_gpt_simple.py's set_hparams)
    np.testing.assert_allclose([eta(0), eta(974), eta(3249)], [1.0, 1.0, (1 - 3249 / 3250) / 0.7], rtol=1e-4)
    eta = optim.lr_factor(llmc.optim, 19_560)
    np.testing.assert_allclose([eta(0), eta(699), eta(19_559)], [1 / 700, 1.0, 0.0], atol=1e-6)


def test_clip_by_norm():
    grads = {"a": jnp.full((4,), 3.0)}  # norm 6
    np.testing.assert_allclose(optim.clip_by_norm(grads, jnp.float32(6.0), 1.0)["a"], 0.5)
    np.testing.assert_allclose(optim.clip_by_norm(grads, jnp.float32(6.0), None)["a"], 3.0)

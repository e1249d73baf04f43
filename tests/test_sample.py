"""KV-cache generation: the same greedy tokens as a full forward per token, for each recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import launch
from jaxrun import model, sample, sharding
from jaxrun.config import ConfigError, apply_overrides

SMALL = [  # in an order that passes validation at each step
    "data.seq_len=32",
    "model.max_seq_len=32",
    "model.head_dim=16",
    "model.model_dim=64",
    "model.num_layers=2",
    "model.vocab_size=256",
    "model.compute_dtype=float32",
]


def _recipe(name: str):
    cfg = launch.load_config(name)
    cfg = apply_overrides(cfg, SMALL)
    params = model.init(jax.random.key(0), cfg.model)
    # Zero-initialized projections and head would make every logit equal: perturb them all.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return cfg, jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("name", ["demo", "simple", "gpt2_llmc"])
def test_cached_greedy_tokens_match_a_full_forward_per_token(name):
    cfg, params = _recipe(name)
    prompt, steps = [3, 17, 42, 5, 99], 10
    context = cfg.data.seq_len
    buf = jnp.zeros((1, context), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    args = (jnp.int32(len(prompt)), jnp.int32(len(prompt) + steps), jax.random.key(0), jnp.float32(0.0))
    cached = sample.generate_ids(params, buf, *args, cfg=cfg.model, top_k=0)[0, : len(prompt) + steps]

    # Recompute the whole sequence for every new token; causal, so the padding after it is unseen.
    forward = jax.jit(lambda params, buf: model.apply(params, buf, cfg))
    ids = list(prompt)
    for _ in range(steps):
        logits = forward(params, jnp.zeros((1, context), jnp.int32).at[0, : len(ids)].set(jnp.asarray(ids)))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    np.testing.assert_array_equal(np.asarray(cached), ids)
    assert len(set(ids[len(prompt) :])) > 1, "a constant output would not test much"


def test_generate_text_compiles_once_and_samples(tiny_cfg):
    params = model.init(jax.random.key(0), tiny_cfg.model)
    mesh = sharding.make_mesh(tiny_cfg.mesh)  # placed as a run leaves them, on its mesh
    params = jax.device_put(jax.tree.map(lambda x: x + 0.1, params), sharding.replicated(mesh))
    sample.generate_ids.clear_cache()  # earlier tests may have compiled this very signature
    before = sample.generate_ids._cache_size()
    settings = ((1.0, 0), (1.0, 1), (0.5, 2))
    texts = {sample.generate(params, tiny_cfg, "Hello", 8, temperature=t, seed=s) for t, s in settings}
    assert all(text.startswith("Hello") for text in texts)
    assert sample.generate_ids._cache_size() == before + 1  # temperature and prompt length are traced
    with pytest.raises(ConfigError, match="num_tokens=64 must be in 1..63"):
        sample.generate(params, tiny_cfg, "Hello", 64)

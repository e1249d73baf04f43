"""record77's optimizer rows (which optimizer, group, lr and shape multipliers own each param) and the
validation of record-only optimizer fields, against the source's param_table (tests/test_record_optim.py
holds the source's layout)."""

import jax
import jax.numpy as jnp
import pytest

from jaxrun import record_optim as ro
from jaxrun.config import ConfigError
from tests.test_record_optim import ROWS, SHAPES, flatten, nest, record_cfg


def test_rows_cover_the_layout():
    kinds = flatten(
        ro.param_kinds(ROWS, nest({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}))
    )
    assert {k for k, v in kinds.items() if v == "normuon"} == {
        *(f"blocks/attn/w_{x}" for x in "qkvo"),
        "blocks/mlp/w_up",
        "blocks/mlp/w_down",
    }
    with pytest.raises(ConfigError, match="matches 0"):
        ro.row_of(ROWS, "blocks/mlp/b_up")
    with pytest.raises(ConfigError, match="matches 2"):
        ro.row_of((*ROWS, ro.OptimRow(pattern="lm_head/.*", group="adam", betas=(0.9, 0.9))), "lm_head/w")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"group": "hidden", "betas": (0.9, 0.9)}, "betas"),
        ({"group": "adam", "betas": (0.9, 1.0)}, "betas"),
        ({"group": "adam", "betas": (0.9, 0.9), "shape_mult": 2.0}, "shape_mult"),
        ({"group": "hidden", "lr_mul": -1.0}, "lr_mul"),
    ],
)
def test_rows_reject_bad_fields(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ro.OptimRow(pattern="w", **kwargs)


def test_adam_rows_need_betas_when_used():
    with pytest.raises(ConfigError, match="gives no Adam betas"):
        ro.row_of((ro.OptimRow(pattern="w", group="adam"),), "w")


def test_model_rows_are_the_recipe_table():
    """The rows the model's components declare give every record77 leaf this test's settings."""
    from jaxrun import model

    for path in (
        "embed/tokens",
        "lm_head/w",
        "value_embed/tables",
        "bigram/table",
        "smear/gate",
        "smear/lambda",
        "blocks/attn/w_q",
        "blocks/attn/w_o",
        "blocks/mlp/w_up",
        "blocks/mlp/w_down",
        "blocks/attn/gate",
        "blocks/attn/ve_gate",
        "blocks/attn/sa_lambdas",
        "residual/resid_lambdas",
        "residual/post_lambdas",
        "residual/x0_lambdas",
        "residual/bigram_lambdas",
        "residual/skip_gate",
        "residual/skip_lambda",
        "residual/backout_lambda",
    ):
        mine, theirs = ro.row_of(model.OPTIM_ROWS, path), ro.row_of(ROWS, path)
        assert (mine.kind, mine.lr_mul, mine.wd_mul, mine.betas, mine.shape_mult) == (
            theirs.kind,
            theirs.lr_mul,
            theirs.wd_mul,
            theirs.betas,
            theirs.shape_mult,
        ), path


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"adam_every": 0}, "optim.adam_every"),
        ({"muon_normuon_b2": 1.0}, "optim.muon_normuon_b2"),
        ({"extension_steps": -1}, "optim.extension_steps"),
        ({"lr_stage_muls": (1.0, 0.0)}, "optim.lr_stage_muls"),
    ],
)
def test_config_validates_record_fields(overrides, match):
    with pytest.raises(ConfigError, match=match):
        record_cfg(**overrides)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"muon_scaling": "shape"}, "muon_scaling"),
        ({"warmup_steps": 5}, "warmup_steps"),
        ({"lr_stage_muls": ()}, "lr_stage_muls"),
        ({"extension_steps": 1490}, "extension_steps"),
    ],
)
def test_make_record_optimizer_rejects_other_recipes(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ro.make_record_optimizer(record_cfg(**overrides), ROWS, 1490)

"""record77's layer plan and schedule: which layer does what, and where training is at a step."""

import math

import numpy as np
import pytest

import launch
from jaxrun import model, schedule
from jaxrun.model import attention


@pytest.fixture(scope="module")
def cfg():
    return launch.load_config("record77")


def test_layer_plan_is_the_records_table(cfg):
    """RECORDS.md §A.1: attention everywhere but layer 6, paired 0/2/5/9, long windows and key
    offset in 3 and 10, value tables in 1/2/8/9/10, layers 8-10 reading the layer-7 activation."""
    plan = model.layer_plan(cfg.model)
    assert [lp.attn_slot for lp in plan] == [0, 1, 2, 3, 4, 5, None, 6, 7, 8, 9]
    assert [i for i, lp in enumerate(plan) if lp.paired] == [0, 2, 5, 9]
    assert [lp.window for lp in plan] == ["short"] * 3 + ["long"] + ["short"] * 2 + [None] + ["short"] * 3 + [
        "long"
    ]
    assert [i for i, lp in enumerate(plan) if lp.key_offset] == [3, 10]
    assert {i: lp.value_table for i, lp in enumerate(plan) if lp.value_table is not None} == {
        1: 0,
        2: 1,
        8: 2,
        9: 3,
        10: 4,
    }
    assert [i for i, lp in enumerate(plan) if lp.reads_saved] == [8, 9, 10]
    assert [i for i, lp in enumerate(plan) if lp.skip_in] == [6]


def test_stages_split_step_and_modes(cfg):
    assert schedule.stage_starts(cfg) == (0, 483, 967, 1450)
    assert schedule.split_step(cfg) == 967
    modes = schedule.train_modes(cfg)
    assert [(m.windows, m.tied) for m in modes] == [
        ((1, 3), True),
        ((3, 7), True),
        ((5, 11), True),
        ((5, 11), False),
        ((6, 13), False),
    ]
    assert schedule.train_mode(cfg, 967).tied and not schedule.train_mode(cfg, 968).tied
    final = schedule.eval_mode(cfg, cfg.train.steps)
    assert final.windows == (6, 20) and final.long_history == (3, 7, 11, 13) and not final.training
    assert schedule.eval_mode(cfg, 250).windows == (1, 3)


def test_yarn_scales_and_frequencies_match_the_record(cfg):
    """RECORDS.md §A.4.8: attn_scale per stage, and the frequency multipliers after all three updates."""
    scales = [attention.attention_scale(cfg.model, schedule.train_mode(cfg, s)) for s in (0, 483, 967, 1450)]
    np.testing.assert_allclose(scales, [0.1, 0.116946, 0.127518, 0.131778], atol=1e-6)
    base = attention.yarn(cfg.model, schedule.train_mode(cfg, 0))
    final = attention.yarn(cfg.model, schedule.train_mode(cfg, 1450))
    expected = [
        1,
        1,
        1,
        0.9862,
        0.8707,
        0.7785,
        0.6573,
        0.5320,
        0.4405,
        0.3801,
        0.3384,
        0.3088,
        0.2871,
        0.2710,
        0.2588,
        0.2495,
        0.2422,
        0.2366,
        0.2322,
    ] + [0.2308] * 13
    np.testing.assert_allclose(final / base, expected, atol=6e-4)
    # the final validation's longer window changes no frequency
    np.testing.assert_array_equal(attention.yarn(cfg.model, schedule.eval_mode(cfg, 1490)), final)


@pytest.mark.parametrize(
    "step, weights",
    [
        (0, [1, 0.5, 0.25]),
        (241, [1, 0.5, 0.25 * (1 - 241 / 483)]),
        (483, [1, 0.5, 0]),
        (725, [1, 0.5 * (1 - 242 / 484), 0]),
        (967, [1, 0, 0]),
        (1489, [1, 0, 0]),
    ],
)
def test_multi_token_weights(cfg, step, weights):
    np.testing.assert_allclose(schedule.multi_token_weights(cfg, step), weights, atol=1e-6)


def test_no_schedule_means_one_mode():
    cfg = launch.load_config("simple")
    assert schedule.train_modes(cfg) == [model.Mode(training=True)]
    assert schedule.multi_token_weights(cfg, 5) is None and schedule.split_step(cfg) is None
    assert math.isclose(attention.attention_scale(cfg.model, schedule.train_mode(cfg, 0)), 0.12)

"""The config tree: defaults, overrides, validation errors, and the recipe files."""

import dataclasses
import json

import pytest

import launch
from jaxrun.config import (
    AttentionConfig,
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    RopeConfig,
    apply_overrides,
)


@pytest.fixture
def cfg():
    return Config(name="t")


def test_frozen_and_hashable(cfg):
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_layers = 3
    assert hash(cfg) == hash(Config(name="t"))


def test_overrides_parse_each_field_type(cfg):
    out = apply_overrides(
        cfg,
        [
            "optim.muon_lr=0.05",
            "model.num_layers=4",
            "model.attn.qk_norm=false",
            "model.attn.scale=none",
            "model.norm=layernorm",
            "train.steps=1_000",
            "data.train_files=/tmp/x_*.bin",
        ],
    )
    assert out.optim.muon_lr == 0.05 and out.model.num_layers == 4 and out.model.attn.qk_norm is False
    assert out.model.attn.scale is None and out.model.norm == "layernorm"
    assert out.train.steps == 1000 and out.data.train_files == "/tmp/x_*.bin"
    assert cfg.optim.muon_lr == 0.025  # the original is untouched


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.muon_lrr=0.05", "no field 'muon_lrr'"),
        ("optimizer.muon_lr=0.05", "no field 'optimizer'"),
        ("model.num_layers=four", "model.num_layers"),
        ("model.norm=batchnorm", "model.norm"),
        ("model=3", "is a section"),
        ("model.num_layers", "expected section.field=value"),
        ("model.model_dim=700", "model.model_dim=700 is not a multiple of model.head_dim=128"),
        ("optim.adam_b1=1.5", "optim.adam_b1=1.5"),
        ("train.steps=0", "train.steps=0"),
    ],
)
def test_bad_overrides_name_the_key_or_value(cfg, override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        apply_overrides(cfg, [override])
    assert fragment in str(err.value)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="rope.fraction"):
        ModelConfig(attn=AttentionConfig(rope=RopeConfig(fraction=0.3)), head_dim=10, model_dim=20)
    with pytest.raises(ConfigError, match="optim.kind='sgd'"):
        OptimConfig(kind="sgd")


def test_learned_positions_must_cover_seq_len():
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        apply_overrides(launch.load_config("gpt2_llmc"), ["data.seq_len=2048"])


@pytest.mark.parametrize("name", ["demo", "simple", "gpt2_llmc"])
def test_recipe_configs_load(name):
    cfg = launch.load_config(name)
    assert cfg.name == name
    assert cfg == launch.load_config(f"configs/{name}.py")


def test_simple_matches_the_recipe():
    cfg = launch.load_config("simple")
    m, o = cfg.model, cfg.optim
    assert (m.num_layers, m.model_dim, m.head_dim, m.num_heads, m.mlp_dim) == (12, 768, 128, 6, 3072)
    assert (m.attn.rope.base, m.attn.rope.fraction, m.attn.scale, m.head.softcap, m.head.softcap_value) == (
        1024.0,
        0.5,
        0.12,
        "isru",
        15.0,
    )
    assert (o.muon_lr, o.muon_weight_decay, o.embed_lr, o.head_lr, o.scalar_lr) == (
        0.025,
        0.05,
        0.7,
        0.004,
        0.015,
    )
    assert (o.adam_b1, o.adam_b2, o.adam_eps) == (0.8, 0.95, 1e-10)
    assert cfg.data.tokens_per_step == 524_288 and cfg.train.steps == 3250


def test_unknown_config_name_lists_choices():
    with pytest.raises(SystemExit, match="choose one of"):
        launch.load_config("nope")


def test_saved_config_round_trips_sub_configs_and_tuples(tmp_path):
    """What a checkpoint stores reads back equal: switched-on sub-configs, tuples, unknown fields refused."""
    from jaxrun.config import WindowConfig, config_changes, config_from_dict, saved_config

    base = Config(name="x")
    attn = dataclasses.replace(base.model.attn, windows=WindowConfig())
    model = dataclasses.replace(base.model, attn=attn, scan_layers=False)
    cfg = dataclasses.replace(
        base, model=model, data=dataclasses.replace(base.data, stages=((4, 16, 64, None),))
    )
    assert config_from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="does not know"):
        config_from_dict({**json.loads(cfg.to_json()), "extra": 1})
    for step, saved in ((3, base), (7, cfg)):
        (tmp_path / "checkpoints" / str(step) / "config").mkdir(parents=True)
        (tmp_path / "checkpoints" / str(step) / "config" / "config.json").write_text(saved.to_json())
    assert saved_config(tmp_path) == cfg  # the newest
    assert "model.attn.windows.block: None -> 128" in config_changes(base, cfg)
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        saved_config(tmp_path / "elsewhere")


def test_data_stages_parse_from_the_command_line():
    from jaxrun.config import Config

    cfg = Config(name="t")
    two = "data.stages=((483, 8, 32768, 2048), [967, 8, 49152, None])"
    assert apply_overrides(cfg, [two]).data.stages == ((483, 8, 32768, 2048), (967, 8, 49152, None))
    assert apply_overrides(cfg, ["data.stages=(100, 16, 1024, None)"]).data.stages == ((100, 16, 1024, None),)
    assert apply_overrides(cfg, ["data.stages=()"]).data.stages == ()
    with pytest.raises(ConfigError, match=r"--set data.stages='\(\(1': not a tuple literal"):
        apply_overrides(cfg, ["data.stages=((1"])
    with pytest.raises(ConfigError, match=r"data.stages=\(\(100, 16, 1024\),\) must be \(step, batch_seqs"):
        apply_overrides(cfg, ["data.stages=((100, 16, 1024),)"])
    with pytest.raises(ConfigError, match="rows of ints"):
        apply_overrides(cfg, ["data.stages=((100, 'a', 1024, None),)"])
    with pytest.raises(ConfigError, match="ranks=8 buffers at a time, but a stage has batch_seqs=12"):
        apply_overrides(cfg, ["data.mode=record", "data.stages=((100, 12, 1024, None),)"])


def test_record77_recipe():
    cfg = launch.load_config("record77")
    m, o, d = cfg.model, cfg.optim, cfg.data
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_attn_layers) == (11, 768, 6, 10)
    assert (m.attn.paired_layers, m.attn.skip_layers, m.embed.value.layers) == (
        (0, 2, 5, 9),
        (6,),
        (1, 2, 8, 9, 10),
    )
    assert (m.head.softcap, m.head.softcap_value, m.head.tie) == ("sigmoid", 23.0, "until_split")
    assert (o.muon_lr, o.adam_lr, o.lr_stage_muls, o.extension_steps) == (0.023, 0.008, (1.0, 1.52, 1.73), 40)
    assert cfg.train.steps == 1490 and d.stages == ((483, 8, 32768, 2048), (967, 8, 49152, 2048))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["model.attn.rope.yarn=false", "model.attn.windows=off"],
            "model.attn.key_offset=True needs model.attn.windows",
        ),
        (["model.attn.skip_layers=()"], "model.residual.skip"),
        (["model.head_dim=256"], "even head count"),
        (["model.scan_layers=true"], "model.scan_layers=True needs identical layers"),
        (["train.steps=300"], "set data.stages to those steps"),
        (["model.embed.value.layers=(6,)"], "model.attn.skip_layers leaves without attention"),
    ],
)
def test_record77_refuses_switches_that_cannot_work(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        apply_overrides(launch.load_config("record77"), overrides)
    assert fragment in str(err.value)

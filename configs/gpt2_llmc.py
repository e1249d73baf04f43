"""`gpt2_llmc`: the llm.c GPT-2 (124M) baseline, record #1 of the speedrun (45 min).

Learned positions, LayerNorm, GELU, tied embeddings, head dim 64. AdamW at lr
6e-4 (betas (0.9, 0.95), wd 0.1 on matrices only), 700 warmup steps then a
cosine decay to zero, gradient clipping at 1.0. 0.5M tokens per step at 1024
context for 19,560 steps (about 10B tokens), as in the record's log.
"""

from jaxrun.config import (
    AttentionConfig,
    Config,
    DataConfig,
    EmbedConfig,
    HeadConfig,
    MLPConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

LR = 6e-4


def get_config() -> Config:
    return Config(
        name="gpt2_llmc",
        model=ModelConfig(
            head_dim=64,
            norm="layernorm",
            linear_biases=True,
            init="gpt2",
            scan_layers=False,
            embed=EmbedConfig(learned_positions=True, norm=False),
            attn=AttentionConfig(qk_norm=False, scale=None, rope=None),
            mlp=MLPConfig(activation="gelu"),
            head=HeadConfig(tie="always", softcap="none"),
        ),
        optim=OptimConfig(
            kind="adamw",
            embed_lr=LR,
            head_lr=LR,
            scalar_lr=LR,
            hidden_lr=LR,
            adam_b1=0.9,
            adam_b2=0.95,
            adam_eps=1e-8,
            adam_weight_decay=0.1,
            adam_decay_vectors=False,
            warmup_steps=700,
            cooldown_frac=1.0,
            cooldown_shape="cosine",
            grad_clip_norm=1.0,
            loss_reduction="mean",
        ),
        data=DataConfig(seq_len=1024, batch_seqs=512, val_tokens=10_485_760),
        train=TrainConfig(steps=19_560, micro_batch_seqs=32, val_every=250),
    )

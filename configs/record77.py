"""`record77`: modded-nanogpt's record #77 (2026-03-06, "SimplifyHC"), 1:26 on 8×H100, 1490 steps.

The speedrun's headline system, each technique a switch. Architecture: 11 layers of width 768
(6 heads of 128), no attention in layer 6 (a gated skip from layer 3 instead), no biases,
RMSNorm without gains, paired-head attention in layers 0, 2, 5, 9, half-truncated RoPE in adjacent
pairs with YaRN at each long-window change, partial key offset and long windows in layers 3 and
10, sigmoid output gates, value embeddings (5 tables: layers 1, 2, 8, 9, 10) with their gates,
smear, a bigram hash embedding, x0/bigram/residual/post lambdas, the layer-7 activation feeding
the attention of layers 8-10 and backed out before the head, softcap 23·σ((z+5)/7.5), an FP8
head, multi-token prediction, and embeddings tied to the head until stage 2.

Optimizer: NorMuon with Polar Express on the matrices (lr 0.023, wd 1.2 cautious and lr-coupled,
β2 0.95, momentum 0.85 → 0.95 over 300 steps and back over the last 50), Adam on the rest (lr
0.008, per-param multipliers and betas from the components' rows), stepped every other step.
Schedule: three stages of 8, 16 and 24 × 2048 tokens per rank-equivalent (8 of them), documents
cut to 896 then 2048 tokens, windows (1,3) → (3,7) → (5,11) → (6,13) blocks of 128, lr ×1, 1.52,
1.73 with a 60% cooldown to 0.15, then 40 extension steps; validation every 250 steps with the
final long window at 20 blocks. On one device each step runs the 8 rank-equivalents as
micro-batches, as the source does on one GPU.
"""

from jaxrun.config import (
    AttentionConfig,
    BigramConfig,
    Config,
    DataConfig,
    EmbedConfig,
    FP8HeadConfig,
    HeadConfig,
    KernelConfig,
    ModelConfig,
    OptimConfig,
    ResidualConfig,
    RopeConfig,
    SkipConfig,
    SmearConfig,
    TrainConfig,
    ValueEmbedConfig,
    WindowConfig,
)

SCHEDULED, EXTENSION = 1450, 40
STAGE_STEPS = (round(SCHEDULED / 3), round(2 * SCHEDULED / 3))  # 483, 967
TOKENS_PER_RANK = (8 * 2048, 16 * 2048, 24 * 2048)


def get_config() -> Config:
    return Config(
        name="record77",
        model=ModelConfig(
            num_layers=11,
            model_dim=768,
            head_dim=128,
            norm_gains=False,
            linear_biases=False,
            init="record",
            scan_layers=False,
            embed=EmbedConfig(value=ValueEmbedConfig(), bigram=BigramConfig(), smear=SmearConfig()),
            attn=AttentionConfig(
                scale=0.1,
                rope=RopeConfig(pairing="interleaved", yarn=True, table_dtype="bfloat16"),
                skip_layers=(6,),
                paired_layers=(0, 2, 5, 9),
                windows=WindowConfig(),
                key_offset=True,
                gate=True,
            ),
            residual=ResidualConfig(
                lambdas=True, skip=SkipConfig(source=3, target=6), saved_layer=7, backout=True
            ),
            head=HeadConfig(
                tie="until_split",
                softcap="sigmoid",
                softcap_value=23.0,
                fp8=FP8HeadConfig(),
                multi_token=(((1.0, 0.5, 0.25), (1.0, 0.5, 0.0)), ((1.0, 0.5), (1.0, 0.0)), ((1.0,), (1.0,))),
            ),
            # On Hopper: Mosaic attention with documents, the Mosaic MLP, the Pallas norm backward;
            # the FP8 head and its multi-token loss as one custom VJP.
            kernels=KernelConfig(attention="auto", mlp="auto", loss="auto", norm="auto"),
        ),
        optim=OptimConfig(
            kind="normuon_adam",
            muon_lr=0.023,
            muon_weight_decay=1.2,
            muon_weight_decay_mode="cautious",
            muon_ns="polar_express",
            muon_scaling="normuon",
            muon_normuon_b2=0.95,
            muon_momentum=0.95,
            muon_momentum_warmup_from=0.85,
            muon_momentum_warmup_steps=300,
            muon_momentum_cooldown_steps=50,
            adam_lr=0.008,
            adam_eps=1e-10,
            adam_weight_decay=0.005,
            adam_every=2,
            lr_stage_muls=(1.0, 1.52, 1.73),
            cooldown_frac=0.6,
            final_lr_frac=0.15,
            extension_steps=EXTENSION,
            loss_reduction="rank_mean",
        ),
        data=DataConfig(
            mode="record",
            ranks=8,
            batch_seqs=8,
            seq_len=TOKENS_PER_RANK[0],
            max_doc_len=896,
            stages=(
                (STAGE_STEPS[0], 8, TOKENS_PER_RANK[1], 2048),
                (STAGE_STEPS[1], 8, TOKENS_PER_RANK[2], 2048),
            ),
            val_seq_len=262_144,
            val_tokens=10_485_760,
            val_batch_seqs=1,
        ),
        train=TrainConfig(steps=SCHEDULED + EXTENSION, micro_batch_seqs=1, val_every=250),
    )

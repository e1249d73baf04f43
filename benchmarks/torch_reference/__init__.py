"""The PyTorch twins of jaxrun's recipes, for parity tests and side-by-side benchmarks.

`model.GPT` and `optim.make_optimizers` are written from the recipes' own
sources (train_gpt_simple.py for `simple`, llm.c's train_gpt2.py for
`gpt2_llmc`) and read jaxrun's `Config`, so both frameworks run the same
settings. `convert` carries weights between jaxrun params and torch state;
`worker` is the process `launch.py bench` and tests/test_parity.py start.
torch is optional: nothing in `jaxrun` imports this package at module level.
"""

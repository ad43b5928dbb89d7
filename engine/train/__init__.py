"""Drafter training: self-distillation data, a shared trainer, and the artifacts drafters load.

- data.py      `specd train data`: the served model's own continuations of offline prompts
- frozen.py    a differentiable forward of the frozen base model (dense attention, no paged cache)
- trainer.py   the loop every drafter shares: AdamW, cosine schedule, held-out eval, checkpoints
- pass_.py     PaSS look-ahead embeddings: initialisation, loss, evaluation (`specd train pass`)
- bpd.py       Blockwise Parallel Decoding heads (`specd train bpd`)
- recycle.py   RecycleGPT's recyclable module (`specd train recycle`)
- job.py       the data and artifact ends every training job shares
- artifact.py  small safetensors files with a JSON header naming the base model (weight hash) and method
- cli.py       the `specd train` subcommands (argparse only; torch is imported when a command runs)
"""

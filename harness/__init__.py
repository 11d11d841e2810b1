"""The harness that train_glue.py and train_vit.py share, one floor below the method files.

    errors    UserError, NonFiniteError and fail(): bad input is one line and an exit code
    weights   state dicts from .safetensors, .pth and .bin files
    config    TrainConfig, the --flags over its fields, --help, cli() and the config checks
    rundir    the run folder: atomic writes, config, log, metrics, checkpoints, resume checks
    schedule  the seeded data order, the RNG state and the learning-rate schedule
    loop      training every method in turn, checkpoints and resume, the results table
    plots     the per-run figures (--plots) read back from the switch events
    parallel  DDP and FSDP2 on the processes torchrun starts
    bert      a BERT encoder, classifier and WordPiece tokenizer in plain torch
    vit       a Vision Transformer in plain torch, from timm, Hugging Face or DINOv2 weights

Models (bert, vit) import only errors and weights, never the loop.
"""

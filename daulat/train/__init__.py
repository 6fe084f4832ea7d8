"""Training: one loop (loop.py) that every stage runs with its own objective and batch source.

    loop.py       Trainer: the step, validation, saving, and the seam for on-policy batch sources
    optim.py      TrainConfig ([train]), the learning-rate schedule, AdamW or Muon and their groups
    muon.py       Muon (2-D matrices and stacked experts) with AdamW for the rest; QK-clip
    distributed.py  torchrun, FSDP2 sharding, whole tensors from shards
    state.py      train state for exact resume; step checkpoints on disk
    metrics.py    metrics.jsonl, TensorBoard, progress bar, throughput, expert load
    common.py     the flags, config and output handling every stage command shares
    pretrain.py   next-token prediction on your files (`daulat pretrain`)

Nothing here imports torch until it is used, so that `daulat --help` stays fast.
"""

_LOOP = ("Dist", "TrainConfig", "Trainer", "init_distributed", "latest_checkpoint", "learning_rate")


def __getattr__(name):
    if name in _LOOP:
        from daulat.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'daulat.train' has no attribute {name!r}")

"""Training: one loop (loop.py) that every stage runs with its own objective and batch source.

    loop.py       Trainer, TrainConfig: optimisation, schedule, FSDP2, metrics, exact resume
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

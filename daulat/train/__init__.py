"""Training: one loop (loop.py) that every stage runs with its own objective and batch source.

    pretrain.py   next-token prediction on your files (`daulat pretrain`)
    common.py     the flags, config and output handling every stage command shares
"""

from daulat.train.loop import Dist, TrainConfig, Trainer, init_distributed, latest_checkpoint, learning_rate

__all__ = ["Dist", "TrainConfig", "Trainer", "init_distributed", "latest_checkpoint", "learning_rate"]

"""Training: one loop (loop.py) that every stage runs with its own objective and batch source.

    loop.py           Trainer, TrainConfig: optimisation, schedule, FSDP2, metrics, exact resume
    stage.py          the one stage skeleton: distributed set-up, output and resume, shared checks,
                      the record (provenance.stage_info with the parent's lineage), the closing summary
    common.py         the command line every stage shares: flags as config overrides, --print-config
    objectives.py     the next-token objectives (pretraining's; assistant tokens only)
    pretrain.py       next-token prediction on your files (`daulat pretrain`)
    sft.py            fine-tuning on conversations (`daulat sft`; rows from daulat/data/conversations.py)
    grpo.py           GRPO's config, objective and stage (`daulat grpo`)
      grpo_math.py    advantages, clipped surrogate, k3, the aggregations
      rollouts.py     the rollout batch source and the rewards
    distill.py        distillation's config, table of modes and stage (`daulat distill`)
      distill_losses.py  forward and reverse KL and their objectives
      teacher_data.py    prompts, and the teacher's answers as a dataset
      on_policy.py       the student's own answers as batches

Nothing here imports torch until it is used, so that `daulat --help` stays fast.
"""

_LOOP = ("Dist", "TrainConfig", "Trainer", "init_distributed", "latest_checkpoint", "learning_rate")


def __getattr__(name):
    if name in _LOOP:
        from daulat.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'daulat.train' has no attribute {name!r}")

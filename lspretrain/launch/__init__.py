"""Launching training: SLURM through submitit (``submit``), site defaults, the job callable.

Process-group set-up from SLURM/torchrun variables lives in ``lspretrain.engine.dist``; the
launcher only adds what the trainer cannot know (requeue, submitit's local executor).
"""

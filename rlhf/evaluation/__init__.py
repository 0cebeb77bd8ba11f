"""Checkpoint evaluation (``hyperalign eval-checkpoints``), one module per job.

- :mod:`~rlhf.evaluation.prompt_sets`: named prompt sets and prompt files;
- :mod:`~rlhf.evaluation.generation`: checkpoint names, per-image seeds, the image cache;
- :mod:`~rlhf.evaluation.scoring`: HyperAlign and critics on image files;
- :mod:`~rlhf.evaluation.report`: statistics, ``report.md``, grids, ``scores.csv/json``;
- :mod:`~rlhf.evaluation.ingest`: records from images generated elsewhere (``--images``);
- :mod:`~rlhf.evaluation.cli`: the command's options and its ``run``.

Pipeline loading, LoRA checks and the seeded generation loop are in :mod:`rlhf.pipeline`;
bootstrap intervals and paired statistics in :mod:`hyperalign.stats`.
"""

"""Project-level code shared by the packages: the ``hyperalign`` command line
(:mod:`hyperalign.cli`), small helpers (:mod:`hyperalign.common`) and statistics
(:mod:`hyperalign.stats`).

The reward model itself is :mod:`reward`; RL fine-tuning is :mod:`rlhf`; the shapes world is
:mod:`shapes`; the critics are :mod:`vlm_tools`.
"""

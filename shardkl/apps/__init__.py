"""Applications built on shardkl; the launchers in ``launch/`` are their command lines.

- ``experiment``: the seed experiment on one rank (:func:`run_rank`) and its table; ``synthetic``: its logits.
- ``grpo``: the tensor-parallel GRPO demo of ``launch/train_tp.py``; ``distill``: the distillation demo of
  ``launch/distill_tp.py``.
- ``ray_job``: the seed experiment as a Ray Train job (``launch/ray_kl.py``).
- ``cli``: the launchers' command lines (dataclass defaults < TOML file < options, one-line errors; jsonargparse,
  from the ``launch`` extra); ``runtime``: threads per rank, the process group, the JSON output; ``progress``:
  progress lines on stderr and timelines.

The library (everything outside ``shardkl.apps`` and ``shardkl.bench``) never imports this package; the import-layer
contract in ``pyproject.toml`` (``lint-imports``, run by CI) checks it.
"""

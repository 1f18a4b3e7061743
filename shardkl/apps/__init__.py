"""Applications built on shardkl: the seed experiment, its configuration, the Ray job runner and the GRPO demo.

The launchers in ``launch/`` are their command lines. The library (everything outside ``shardkl.apps`` and
``shardkl.bench``) never imports this package; ``.importlinter`` and CI check it.
"""

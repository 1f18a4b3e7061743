"""The benchmark application: ``python -m shardkl.bench`` (``docs/performance.md`` explains how to read it).

An application, like ``shardkl.apps``: the library never imports it. Modules:

- :mod:`shardkl.bench.methods`: what is timed (the read-once floor, the baselines, shardkl per ``impl``);
- :mod:`shardkl.bench.measure`: timing, memory accounting and the per-rank loop that streams rows to JSONL;
- :mod:`shardkl.bench.report`: the table, the summary and the plot;
- :mod:`shardkl.bench.cli`: the command line and the sweeps (``__main__`` runs it).
"""

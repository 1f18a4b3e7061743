"""Integrations of shardkl with other stacks; each imports its third-party dependency lazily.

- :mod:`shardkl.integrations.dtensor`: ``torch.distributed.tensor.DTensor`` logits sharded on the vocabulary (the
  group comes from the mesh).
- :mod:`shardkl.integrations.ray`: Ray Train jobs and an API for existing Ray worker groups.

Megatron-core needs no adapter: pass the trainer's own tensor-parallel ``ProcessGroup`` as ``group=`` (README: "Use
inside your trainer"); shardkl keeps no global parallel state.
"""

from __future__ import annotations

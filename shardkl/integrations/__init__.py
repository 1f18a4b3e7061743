"""Front doors for the tensor types and process-group conventions of training frameworks.

``dtensor``: ``torch.distributed.tensor.DTensor`` logits sharded on the vocabulary (the group comes from the mesh).
Megatron-core and Ray need no adapter: pass the trainer's own tensor-parallel ``ProcessGroup`` as ``group=``
(see ``docs/trainer.md``); shardkl keeps no global parallel state.
"""

from __future__ import annotations

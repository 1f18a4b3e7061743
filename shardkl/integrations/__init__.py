"""Integrations of shardkl with other stacks; each imports its third-party dependency lazily.

- :mod:`shardkl.integrations.ray`: shardkl on the workers of an existing Ray worker group.
- :mod:`shardkl.integrations.hf`: a Hugging Face causal LM's logits as a :class:`shardkl.LinearLogits` (from its last
  hidden state and ``lm_head``, plain or column-parallel).

DTensor logits need no adapter (every public function accepts them), nor does Megatron-core: pass the trainer's
own tensor-parallel ``ProcessGroup`` as ``group=`` (``docs/trainers.md``); shardkl keeps no global parallel state.
"""

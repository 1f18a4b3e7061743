"""Integrations of shardkl with other stacks; each imports its third-party dependency lazily.

- :mod:`shardkl.integrations.ray`: Ray Train jobs and an API for existing Ray worker groups.
"""

from __future__ import annotations

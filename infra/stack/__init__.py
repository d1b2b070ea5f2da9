"""The local stack: Kafka, PostgreSQL, OPA and an LLM server on 127.0.0.1, state under one data directory.

`pilothouse stack up|status|down|env|apply` (see `pilothouse.stack.cli.main`); tests and services read connection
details with `StackInfo.load()`.
"""

from pilothouse.stack.info import StackInfo

__all__ = ["StackInfo"]

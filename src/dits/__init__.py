"""dits: Data Influence-oriented Tree Search for self-training LLM multi-agent systems."""

__version__ = "0.1.0"

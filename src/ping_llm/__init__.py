"""ping-llm: a generative foundation model of Internet latency.

A decoder-only Transformer trained on RIPE Atlas ping measurements, tokenised into a byte-level
language (see `ping_llm.tokens`), that answers latency questions about any pair of addresses.
"""

__version__ = "0.1.0"

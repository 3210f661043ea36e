"""The stages: one file per command, each a readable loop built from the primitives (see docs/architecture.md)."""

"""Plumbing shared by every stage: config dataclasses, the run harness, checkpoints, the run log, training helpers."""

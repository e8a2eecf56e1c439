"""The soak (scripts/soak.py): world, writers, readers, faults, memory, checks, report, load."""

"""Operator and developer commands; thin wrappers over the packages."""

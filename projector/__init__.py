"""The write side: keeps the dashboard read model in Redis from Postgres's changes."""

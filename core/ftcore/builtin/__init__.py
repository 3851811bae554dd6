"""Core features registered as plugins (always enabled)."""

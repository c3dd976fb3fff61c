"""Adapters that put flexattn under other libraries' attention code (one call each)."""

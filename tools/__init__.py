"""Tools that measure or read runs; nothing in common/ imports them."""

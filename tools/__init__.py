"""Tools that measure or read runs (benchmark, compare); nothing in common/ imports them."""

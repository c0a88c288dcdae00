"""A .gguf model file read through once before loading: a truncated or damaged file is one clear line, not a
numpy reshape error from deep inside transformers."""

from __future__ import annotations

from pathlib import Path


def gguf_problem(path: Path) -> str | None:
    """None when every tensor the header lists lies within the file; else what is wrong, with the file's size."""
    import gguf

    try:
        gguf.GGUFReader(path)  # memory-maps the file and builds a view of every tensor: it reads no weights
    except (ValueError, IndexError, KeyError, OSError) as err:
        return f"truncated or corrupt GGUF file ({path.stat().st_size:,} bytes; {str(err).splitlines()[0]})"
    return None

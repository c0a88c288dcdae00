"""The Hugging Face Hub: asked once, briefly, whether it answers; if not, everything loads from the local cache.

Without this, an unreachable Hub costs 30-55 s of retries per file before the loaders give up.
"""

from __future__ import annotations

import os
import threading

from huggingface_hub import constants

HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_BY_REQUEST = "HF_HUB_OFFLINE=1 keeps the Hugging Face Hub off"
SMOKE_HINT = "or use --smoke for the offline tiny model and sample"

_offline_reason: str | None = None  # why the Hub is not used, once the probe found it unreachable
_offline_fixes: list[str] = []  # what the user passes to need nothing from the Hub


def first_line(err: BaseException, limit: int = 200) -> str:
    lines = f"{type(err).__name__}: {err}".strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def probe(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub answers within `timeout_s`; otherwise why not. Any HTTP answer counts as an answer."""
    from huggingface_hub.utils import get_session

    outcome: dict[str, str | None] = {}

    def ask() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout_s)
            outcome["error"] = None
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
            outcome["error"] = first_line(err)

    # In a thread, because a name lookup that hangs is not bounded by the HTTP timeout.
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if thread.is_alive():
        return f"no answer within {timeout_s:g} s"
    return outcome["error"]


def use_cache_only(reason: str) -> None:
    """From now on transformers and datasets read the local cache and never wait on the network."""
    global _offline_reason
    _offline_reason = reason
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub, and by datasets when it is imported
    try:
        import datasets.config
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = True


def check_reachable(needs: dict[str, str]) -> None:
    """`needs`: what this run would fetch from the Hub -> the option that makes it local. Probe only if anything is."""
    global _offline_fixes
    _offline_fixes = list(needs.values())
    if not needs:
        return
    if offline_by_request():
        use_cache_only(OFFLINE_BY_REQUEST)
        return
    reason = probe()
    if reason is not None:
        print(f"note: the Hugging Face Hub is unreachable ({reason}): loading {' and '.join(needs)} from the local "
              "cache only")
        use_cache_only(f"the Hugging Face Hub is unreachable ({reason})")


def offline_by_request() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now or when huggingface_hub was imported."""
    set_now = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
                  for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return set_now or constants.HF_HUB_OFFLINE


def offline_reason() -> str | None:
    """Why the Hub is not used (a clause for an error message), or None when it is."""
    if _offline_reason is None and offline_by_request():
        return OFFLINE_BY_REQUEST
    return _offline_reason


def failure_message(what: str, err: BaseException, fixes: list[str] | None = None) -> str:
    """One line: why `what` could not come from the Hub, and what to pass instead."""
    fixes = fixes if fixes is not None else _offline_fixes
    instead = f"pass {' and '.join(fixes)}, {SMOKE_HINT}" if fixes else SMOKE_HINT.removeprefix("or ")
    reason = offline_reason()
    if reason is not None:
        return f"{what}: not in the local cache, and {reason}. To run offline, {instead}."
    return f"{what}: could not load it from the Hugging Face Hub ({first_line(err)}). {instead[0].upper()}{instead[1:]}."


DATA_FIX = "--data-dir DIR (PIQA's release files)"
MODEL_FIX = "--model PATH (a local model directory or .gguf file)"

"""The check that a resumed output (a heal checkpoint, a sweep's results.jsonl) was made with the
same settings as the run that wants to continue it."""

from __future__ import annotations


def settings_difference(saved: dict, now: dict, most: int = 5) -> str | None:
    """None when `saved` and `now` agree on every key; else `key: saved there, now now; ...` for the
    first `most` keys that differ (sorted), for the error that refuses to mix two runs."""
    different = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if not different:
        return None
    return "; ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in different[:most])

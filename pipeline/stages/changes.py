"""Why a stage's inputs differ from those it was last built with, in words (``status``, ``run``, ``cache import``):
config fields by dotted name, upstream keys, and each part of the input fingerprint described by the stage's
``reads`` (pipeline/data/reads.py)."""
from __future__ import annotations

from typing import Any

from pipeline.stages import registry


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"a.b.c": leaf}; lists are leaves."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def explain_change(stage: str, old: dict, new: dict, data=None) -> list[str]:
    """Human reasons why the inputs of a stage differ from those it was last built with.

    ``data`` = (manifest the experiment last built or None, current manifest, dataset.yaml synthetic block):
    with it, a changed fingerprint part is named with counts ("splits changed: 2 frames moved ...")."""
    why: list[str] = []
    if old.get("schema") != new.get("schema"):
        why.append(f"stage schema version changed ({old.get('schema')} -> {new.get('schema')})")
    of, nf = flatten(old.get("config", {})), flatten(new.get("config", {}))
    for k in sorted(set(of) | set(nf)):
        if of.get(k, "<absent>") != nf.get(k, "<absent>"):
            why.append(f"config field {stage}.{k} changed ({of.get(k, '<absent>')!r} -> {nf.get(k, '<absent>')!r})")
    ou, nu = old.get("upstream", {}), new.get("upstream", {})
    for k in sorted(set(ou) | set(nu)):
        if ou.get(k) != nu.get(k):
            label = "dataset manifest" if k == "manifest" else f"{k}"
            why.append(f"upstream {label} changed ({str(ou.get(k))[:12]} -> {str(nu.get(k))[:12]})")
    ofp, nfp = old.get("fingerprint"), new.get("fingerprint")
    if ofp != nfp:
        if isinstance(ofp, dict) and isinstance(nfp, dict):
            from pipeline.data.reads import describe

            old_m, new_m, synthetic = data if data is not None else (None, None, None)
            for part in sorted(set(ofp) | set(nfp)):
                if ofp.get(part) == nfp.get(part):
                    continue
                if part == "frames" and stage == "manifest":
                    why.append(frames_changed(old_m, new_m))
                else:
                    why.append(describe(registry.stage(stage).reads, part, ofp.get(part), old_m, new_m, synthetic))
        elif stage == "manifest":
            why.append(frames_changed(*(data or (None, None))[:2]))
        else:
            why.append("input fingerprint changed")
    return why or ["inputs differ"]


def frames_changed(old_m, new_m) -> str:
    """'frames changed: 1 added, 2 modified' between two manifests (matched by frame id)."""
    if old_m is None or new_m is None:  # the old manifest is gone or unreadable
        return "frames changed"
    a = dict(zip(old_m.frame_ids, old_m.fingerprints))
    b = dict(zip(new_m.frame_ids, new_m.fingerprints))
    added = len(set(b) - set(a))
    removed = len(set(a) - set(b))
    modified = sum(1 for k in set(a) & set(b) if a[k] != b[k])
    parts = [f"{n} {w}" for n, w in ((added, "added"), (removed, "removed"), (modified, "modified")) if n]
    return "frames changed: " + (", ".join(parts) if parts else "order changed")

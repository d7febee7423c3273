"""Answers composed from several parts of the store: resolve (the planner's question) and
the overview the CLI, API and status page list. Both only read.

``resolve`` is pure with respect to the store: it records nothing. Whether a version is
*in use* is decided when a boot session starts (``ImageStore.mark_used``), so asking what
a machine would get -- CLI ``plan``, the API, ``planner.peek`` -- never keeps a version
from GC.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..model import ImageRef
from .catalogue import Versions
from .pins import Pins
from .pointers import Channels
from .usage import StoreUsage

log = logging.getLogger("netbootd.store")

#: Activation history entries per image in the overview (history() has them all).
LIST_HISTORY = 50


def resolve(versions: Versions, channels: Channels, pins: Pins, image: str, channel: str,
            pin: str | None, *, mac: str | None = None) -> ImageRef | None:
    """The inventory's ``pin``, else the store's pin for ``mac`` (falling back to the
    channel when its version vanished), else the channel's active version; None when
    there is nothing to boot. An inventory pin naming a missing version is None rather
    than a guess (the planner reports it)."""
    if pin:
        ref = versions.ref(image, pin)
        if ref is None:
            log.warning("pinned version %s of %s is not in the store", pin, image)
            return None
        return replace(ref, channel=channel, pinned=True)
    if mac:
        pinned = pins.for_mac(mac, image)
        if pinned is not None:
            ref = versions.ref(image, pinned)
            if ref is not None:
                return replace(ref, channel=channel, pinned=True)
            log.warning("store pin %s -> %s/%s: version missing; using channel %s",
                        mac, image, pinned, channel)
    version = channels.active(image, channel)
    if version is None:
        return None
    ref = versions.ref(image, version)
    if ref is None:
        log.error("channel %s/%s points at missing version %s", image, channel, version)
        return None
    return replace(ref, channel=channel)


def overview(versions: Versions, channels: Channels, pins: Pins,
             usage: StoreUsage | None = None) -> list[dict]:
    """JSON-able list of images: channels, versions (kind, size, boards, where active,
    who pins them), recent activation history, and with ``usage`` the image's logical
    and physical bytes."""
    pinned = pins.pins()
    hist = channels.history()
    out = []
    for image in versions.images():
        chans = channels.channels(image)
        rows = []
        for v in versions.versions(image):
            m = versions.manifest(image, v)
            if m is None:
                continue
            rows.append({
                "version": v, "created": m.created.isoformat().replace("+00:00", "Z"),
                "kind": m.kind, "size": m.total_size, "boards": list(m.boards),
                "active_on": sorted(c for c, av in chans.items() if av == v),
                "pinned_by": sorted(mac for mac, p in pinned.items()
                                    if p.get("version") == v
                                    and p.get("image") in (None, image)),
            })
        mine = [h for h in hist if h.get("image") == image]
        out.append({"name": image, "channels": chans, "versions": rows,
                    "history": mine[-LIST_HISTORY:],
                    **(usage.images[image].to_dict()
                       if usage is not None and image in usage.images
                       else {"logical_bytes": 0, "physical_bytes": 0})})
    return out

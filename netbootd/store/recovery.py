"""Start-up repair after a crash: every durable step of the store leaves the old or the new
state, and this turns "a crash happened somewhere" back into a consistent store.

Removed: stale staging (half ingests, half GC deletions), promoted leftovers in incoming/
(``.done-*``), interrupted uploads, temp files of pointer and state rewrites. Repaired: a
pointer naming a missing version goes back to the last existing version in its history;
a pointer the history does not know (crash between swap and append) gets a
``by: recovery`` entry. Last, the content pool is swept: an object no version links (its
build died in staging, or GC died before its sweep) is deleted, and the files of versions
promoted before the pool existed are enrolled in it (new links only). Builds still in incoming/ are left for the watcher to re-ingest.
"""

from __future__ import annotations

import logging
import os

from .catalogue import Versions
from .layout import (
    DONE_PREFIX,
    Layout,
    fsync_dir,
    is_upload_leftover,
    remove_tree,
    write_atomic,
)
from .objects import Pool
from .pointers import Channels

log = logging.getLogger("netbootd.store")


def recover(layout: Layout, versions: Versions, channels: Channels, pool: Pool | None = None
            ) -> list[str]:
    """Repair the store; return what was done, one line each (the daemon's health shows it).

    The caller holds the writer lock: staging/ may be in use by any other writer.
    """
    done: list[str] = []
    for e in list(layout.staging.iterdir()):
        remove_tree(e)
        done.append(f"removed stale staging {e.name}")
    for e in list(layout.incoming.iterdir()):
        if e.name.startswith(DONE_PREFIX) or is_upload_leftover(e.name):
            remove_tree(e)
            done.append(f"removed leftover {e.name}")
    for d in [layout.channels, layout.state_dir, layout.rejected,
              *(x for x in layout.channels.iterdir() if x.is_dir())]:
        for e in list(d.iterdir()):
            if e.name.startswith(".") and e.name.endswith(".tmp"):
                remove_tree(e)
    for e in list(layout.rejected.glob("*.manifest.json")):
        name = e.name[: -len(".manifest.json")]
        if not layout.reason_file(name).exists():  # a crash before its reason was written
            remove_tree(e)
            done.append(f"removed orphaned {e.name}")
    hist = channels.history()
    for image in versions.images():
        for channel, version in channels.channels(image).items():
            mine = [h for h in hist if h.get("image") == image and h.get("channel") == channel]
            last = mine[-1] if mine else None
            if versions.manifest(image, version) is None:
                back = next((str(h["version"]) for h in reversed(mine) if h.get("version")
                             and versions.manifest(image, str(h["version"])) is not None),
                            None)
                p = layout.pointer(image, channel)
                if back:
                    write_atomic(p, (back + "\n").encode())
                else:
                    p.unlink()
                channels.record_recovery(image, channel, back, version,
                                         f"pointer named missing version {version}")
                done.append(f"{image}/{channel}: pointer to missing {version} -> {back}")
            elif last is None or last.get("version") != version:
                channels.record_recovery(image, channel, version,
                                         last.get("version") if last else None,
                                         "history missed this activation (crash)")
                done.append(f"{image}/{channel}: history repaired ({version})")
    if pool is not None:
        count, freed = pool.sweep()
        if count:
            done.append(f"removed {count} unreferenced objects ({freed} bytes)")
        done += enrol_old_versions(versions, pool)
    for line in done:
        log.info("recovery: %s", line)
    return done


def enrol_old_versions(versions: Versions, pool: Pool) -> list[str]:
    """Versions promoted before the content pool existed: their files become objects
    (new links, the versions' files untouched), so the next build shares with them. A
    version is recognised by its first artefact having one link: one ``lstat`` per
    version at start-up once they are enrolled."""
    done = []
    for image in versions.images():
        for v in versions.versions(image):
            m = versions.manifest(image, v)
            if m is None or not m.artefacts:
                continue
            root = versions.layout.version_dir(image, v)
            try:
                if os.lstat(root / m.artefacts[0].path).st_nlink != 1:
                    continue
            except FileNotFoundError:
                continue
            added = [o for a in m.artefacts if (o := pool.enrol(root / a.path, a.sha256))]
            for d in sorted({o.parent for o in added}):
                fsync_dir(d)
            if added:
                done.append(f"{image}/{v}: {len(added)} files enrolled in the content pool")
    return done

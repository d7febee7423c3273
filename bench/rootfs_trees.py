"""Debian minbase trees for the store benchmark (bench/store_bench.py --rootfs).

Version N is ``debootstrap --variant=minbase`` of bookworm; version N+1 is the same plus
one package (``less``): what a CI build of a rootfs looks like one merge later. Both are
made once, with the project's debootstrap recipe (images/build_golden.py: the apt
mirror, the .deb cache in images/cache/debootstrap-debs, the same generalising), and
cached in ``images/cache/store-bench/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "images"))

import build_golden as golden  # the images/ scripts are not a package

CACHE = REPO / "images" / "cache"
#: The one package version N+1 adds.
EXTRA = "less"


def minbase(extra: list[str]) -> Path:
    """The generalised minbase tree (+ ``extra`` packages), from the cache or made now."""
    name = "minbase" + "".join(f"+{p}" for p in extra)
    tree = CACHE / "store-bench" / name
    done = tree.with_name(name + ".done")
    if done.exists() and tree.is_dir():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    debs = CACHE / "debootstrap-debs"
    debs.mkdir(parents=True, exist_ok=True)
    tmp = tree.with_name(f".{name}.tmp")
    golden.remove_tree(tmp)
    golden.remove_tree(tree)
    include = [f"--include={','.join(extra)}"] if extra else []
    log = tree.with_name(name + ".log")
    t0 = time.monotonic()
    print(f"debootstrap {golden.SUITE} {name} (a few minutes)", file=sys.stderr, flush=True)
    with log.open("wb") as out:
        subprocess.run(["debootstrap", "--variant=minbase", *include, f"--cache-dir={debs}",
                        "--merged-usr", golden.SUITE, str(tmp), golden.apt_mirror()],
                       check=True, stdout=out, stderr=subprocess.STDOUT,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if golden.mounts_under(tmp):
        raise RuntimeError(f"debootstrap left mounts under {tmp}")
    golden.generalise(tmp)
    tmp.rename(tree)
    done.write_text(json.dumps({"suite": golden.SUITE, "extra": extra,
                                "seconds": round(time.monotonic() - t0)}) + "\n")
    return tree


if __name__ == "__main__":
    print(minbase([]))
    print(minbase([EXTRA]))

"""The store satisfies the Catalogue view the API, CLI, status page and NFS are given."""

from __future__ import annotations

import inspect
from typing import get_type_hints

from netbootd.interfaces import Catalogue
from netbootd.store.store import ImageStore


def _members(proto: type) -> list[str]:
    return [n for n, v in vars(proto).items()
            if not n.startswith("_") and (callable(v) or isinstance(v, property))]


def test_image_store_has_every_catalogue_member_with_a_compatible_signature() -> None:
    members = _members(Catalogue)
    assert {"list_images", "resolve", "mark_used", "gc", "ingest_upload",
            "on_change"} <= set(members)
    for name in members:
        want = inspect.getattr_static(Catalogue, name)
        have = inspect.getattr_static(ImageStore, name, None)
        assert have is not None, f"ImageStore lacks {name}"
        if isinstance(want, property):
            assert isinstance(have, property), name
            continue
        assert inspect.iscoroutinefunction(want) == inspect.iscoroutinefunction(have), name
        ws, hs = inspect.signature(want), inspect.signature(have)
        for p in ws.parameters.values():
            q = hs.parameters.get(p.name)
            assert q is not None, f"{name}: ImageStore lacks parameter {p.name}"
            assert q.kind == p.kind, f"{name}({p.name}): {q.kind} vs {p.kind}"
            assert (q.default is inspect.Parameter.empty) == \
                (p.default is inspect.Parameter.empty), f"{name}({p.name}) default"
            if p.default is not inspect.Parameter.empty:
                assert q.default == p.default, f"{name}({p.name}) default value"
        extra = [q for q in hs.parameters.values() if q.name not in ws.parameters
                 and q.default is inspect.Parameter.empty]
        assert not extra, f"{name}: ImageStore requires more than the Catalogue passes"


def test_return_types_agree() -> None:
    for name in _members(Catalogue):
        want = inspect.getattr_static(Catalogue, name)
        if isinstance(want, property):
            continue
        w = get_type_hints(want).get("return")
        h = get_type_hints(getattr(ImageStore, name)).get("return")
        assert w == h, f"{name}: returns {h}, Catalogue says {w}"


def test_a_real_store_is_usable_as_the_view(tmp_path) -> None:
    from netbootd.settings import StoreSettings

    view: Catalogue = ImageStore(tmp_path / "i", tmp_path / "s", StoreSettings())
    seen = []
    view.on_change.append(lambda: seen.append(1))
    assert view.list_images() == [] and view.all_refs() == [] and view.gc() == []

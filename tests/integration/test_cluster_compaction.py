"""A replica cut off from etcd while etcd compacts its history misses nothing: when its
watch resumes at a revision that is gone, it reads the prefix afresh and reports what
was written and what was deleted meanwhile. A real etcd, a real TCP gate in front of it
for the cut-off replica, and etcd's own compaction (what ``--auto-compaction-retention``
runs); its own module, so the compaction touches no other test's etcd."""

from __future__ import annotations

from tests.etcdkit import Gate, wait_for


def test_a_watch_behind_a_compaction_reads_the_prefix_afresh(etcd_one, clients, prefix):
    direct = clients()
    gate = Gate(etcd_one.endpoints[0])
    try:
        cut = clients([gate.endpoint])
        for key in "abcd":
            direct.put(prefix + key, "1")
        kvs, revision = cut.range_prefix(prefix)
        seen = {kv.key: kv.value for kv in kvs}
        deletes: list[str] = []

        def follow(events, _revision):
            for e in events:
                if e.deleted:
                    deletes.append(e.kv.key)
                    seen.pop(e.kv.key, None)
                else:
                    seen[e.kv.key] = e.kv.value

        cut.watch(prefix, revision, follow, known=(kv.key for kv in kvs))
        direct.put(prefix + "e", "1")
        wait_for(lambda: prefix + "e" in seen, 30, "the watch through the gate")

        gate.shut()  # the replica is cut off; the others go on writing
        direct.delete(prefix + "a")
        direct.put(prefix + "b", "2")
        direct.put(prefix + "f", "1")
        direct.delete(prefix + "e")
        last = direct.put(prefix + "c", "2")
        direct.call("/v3/kv/compaction", {"revision": str(last), "physical": True})
        gate.open()

        want = {kv.key: kv.value for kv in direct.range_prefix(prefix)[0]}
        assert want == {prefix + "b": b"2", prefix + "c": b"2", prefix + "d": b"1",
                        prefix + "f": b"1"}
        wait_for(lambda: seen == want, 60, "the cut-off watch catching up")
        assert sorted(deletes) == [prefix + "a", prefix + "e"]
        assert cut.caught_up == 1
        # and it follows on from there as before
        direct.put(prefix + "g", "1")
        wait_for(lambda: seen.get(prefix + "g") == b"1", 30, "a write after the catch-up")
    finally:
        gate.shut()


def test_a_cut_off_replica_learns_the_activation_and_unpin_it_missed(etcd_one, clients,
                                                                       prefix):
    """What that means for a replica: a channel moved and a pin removed while it was cut
    off and etcd compacted are both in its memory (and told to its store) once it is
    back, instead of the old version being planned until the next change."""
    from netbootd.cluster.pointers import StoreMirror

    direct = clients()
    gate = Gate(etcd_one.endpoints[0])
    try:
        channel, pin = prefix + "store/channels/demo/prod", prefix + "store/pins/02:00:00:00:00:01"
        direct.put(channel, "1")
        direct.put(pin, '{"version": "1", "image": "demo"}')
        mirror = StoreMirror(clients([gate.endpoint]), prefix, "cut")
        told: list[tuple] = []
        mirror.listeners.append(told.append)
        assert mirror.pointers[("demo", "prod")][0] == "1" and "02:00:00:00:00:01" in mirror.pins

        gate.shut()
        direct.delete(pin)
        last = direct.put(channel, "2")  # another replica's activation
        direct.call("/v3/kv/compaction", {"revision": str(last), "physical": True})
        gate.open()

        wait_for(lambda: mirror.pointers[("demo", "prod")][0] == "2" and not mirror.pins, 60,
                 "the cut-off replica learning the activation and the unpin")
        assert ("channel", "demo", "prod") in told and ("pin", "02:00:00:00:00:01") in told
    finally:
        gate.shut()


def test_a_watch_that_tracks_no_keys_catches_up_the_writes(etcd_one, clients, prefix):
    """``known=None`` (node event rings: slots are overwritten or expire, too many to
    track): the catch-up reports what was written, with one read."""
    direct = clients()
    gate = Gate(etcd_one.endpoints[0])
    try:
        cut = clients([gate.endpoint])
        direct.put(prefix + "slot0", "a")
        _kvs, revision = cut.range_prefix(prefix)
        seen: dict[str, bytes] = {}
        cut.watch(prefix, revision,
                  lambda events, _rev: seen.update((e.kv.key, e.kv.value) for e in events),
                  known=None)
        direct.put(prefix + "slot1", "b")
        wait_for(lambda: prefix + "slot1" in seen, 30, "the watch through the gate")
        gate.shut()
        direct.put(prefix + "slot0", "c")
        last = direct.put(prefix + "slot2", "d")
        direct.call("/v3/kv/compaction", {"revision": str(last), "physical": True})
        before = cut.requests
        gate.open()
        wait_for(lambda: seen.get(prefix + "slot0") == b"c" and prefix + "slot2" in seen, 60,
                 "the writes made while cut off")
        assert cut.caught_up == 1 and cut.requests - before == 1
    finally:
        gate.shut()

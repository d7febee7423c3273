"""metrics.Tally: hot-path counts reach the registry exactly once, whoever reads it."""

from __future__ import annotations

import threading

from netbootd.metrics import Metrics


def _value(m: Metrics, kind: str, decision: str) -> float:
    return m.registry.get_sample_value(
        "netbootd_dhcp_replies_total", {"kind": kind, "decision": decision}) or 0.0


def test_tally_is_folded_on_every_read_and_never_twice():
    m = Metrics()
    tally = m.tally(m.dhcp_replies)
    tally.counts[("rpi", "offer")] += 3
    assert _value(m, "rpi", "offer") == 3
    assert _value(m, "rpi", "offer") == 3, "a second read must not add the counts again"
    tally.counts[("rpi", "offer")] += 2
    tally.counts[("ipxe", "ack")] += 1
    assert _value(m, "rpi", "offer") == 5
    assert _value(m, "ipxe", "ack") == 1
    # Direct increments of the same counter still add up with the tally's.
    m.dhcp_replies.labels("rpi", "offer").inc()
    assert _value(m, "rpi", "offer") == 6


def test_no_increment_is_lost_while_another_thread_scrapes():
    m = Metrics()
    tally = m.tally(m.bytes_sent)
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            m.registry.get_sample_value("netbootd_bytes_sent_total", {"service": "dhcp"})

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for _ in range(200_000):
            tally.counts[("dhcp",)] += 1
    finally:
        stop.set()
        t.join()
    assert m.registry.get_sample_value("netbootd_bytes_sent_total",
                                       {"service": "dhcp"}) == 200_000

"""Prometheus metrics, one registry per daemon (no global state, tests run many daemons).

Every service counts what it did and every bad input it dropped; ``/metrics``
exposes the registry. Names are stable: dashboards and alerts depend on them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """All netbootd metrics. Services get this via ``app.metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "netbootd_requests", "Requests handled, by service and outcome",
            ["service", "outcome"], registry=r)
        self.malformed = Counter(
            "netbootd_malformed_inputs", "Malformed packets/requests dropped, by service",
            ["service"], registry=r)
        self.errors = Counter(
            "netbootd_errors", "Internal errors while handling a request, by service",
            ["service"], registry=r)
        self.bytes_sent = Counter(
            "netbootd_bytes_sent", "Payload bytes sent, by service", ["service"], registry=r)
        self.active_transfers = Gauge(
            "netbootd_active_transfers", "Transfers in progress, by service",
            ["service"], registry=r)
        self.boots = Counter(
            "netbootd_boot_phases", "Boot phase events seen (dhcp, booted, joined, ...)",
            ["phase"], registry=r)
        self.dhcp_replies = Counter(
            "netbootd_dhcp_replies", "Proxy-DHCP decisions, by client kind and decision",
            ["kind", "decision"], registry=r)
        self.image_activations = Counter(
            "netbootd_image_activations", "Channel pointer swaps", ["image", "channel"],
            registry=r)
        self.ingest_failures = Counter(
            "netbootd_ingest_failures", "Builds rejected by ingest", registry=r)
        self.config_reloads = Counter(
            "netbootd_config_reloads", "Inventory/config reloads by outcome", ["outcome"],
            registry=r)
        self.transfer_seconds = Histogram(
            "netbootd_transfer_seconds", "Duration of completed file transfers",
            ["service"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60))

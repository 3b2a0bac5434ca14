"""A TLS scanner against an envoyx TLS listener with default settings: sslyze (from PyPI,
the ``test`` extra) tries every protocol version from SSL 2.0 to TLS 1.3 and, in each,
every cipher suite it knows, one handshake at a time.

The listener's ``DownstreamTlsContext`` names its certificates and nothing else: the
protocol versions, cipher suites and curves are envoyx's defaults. It serves an RSA
2048 and an ECDSA P-256 certificate, so that suites of both authentication kinds are
really offered by the server (a suite for a key the server does not have would be
refused whatever the settings). The test fails if the scanner cannot connect, if SSL
2.0/3.0 or TLS 1.0/1.1 is accepted at all, if any accepted suite is not an AEAD
(AES-GCM, ChaCha20-Poly1305, AES-CCM) with forward secrecy (an ephemeral (EC)DHE key
exchange; every TLS 1.3 suite is both), if TLS compression or a client-initiated
renegotiation is accepted, or if no TLS 1.2 or no TLS 1.3 suite is.

It runs against envoyx and, as the second parametrization, against Envoy 1.40 with the
same bootstrap: Envoy's defaults pass too (TLS 1.2 and 1.3; in TLS 1.2 the six ECDHE
suites with AES-GCM or ChaCha20-Poly1305, as envoyx), so the check holds envoyx to
Envoy's defaults as well as to the rule. A scan takes about a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sslyze import (
    CipherSuitesScanResult,
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
)

from support.bootstrap import bootstrap
from support.proxy import ProxyProcess
from support.tls import downstream_tls, https_listener, shared_pki
from support.wait import free_port

StartProxy = Callable[..., ProxyProcess]

WEAK_PROTOCOLS = {
    ScanCommand.SSL_2_0_CIPHER_SUITES: "SSL 2.0",
    ScanCommand.SSL_3_0_CIPHER_SUITES: "SSL 3.0",
    ScanCommand.TLS_1_0_CIPHER_SUITES: "TLS 1.0",
    ScanCommand.TLS_1_1_CIPHER_SUITES: "TLS 1.1",
}
GOOD_PROTOCOLS = {
    ScanCommand.TLS_1_2_CIPHER_SUITES: "TLS 1.2",
    ScanCommand.TLS_1_3_CIPHER_SUITES: "TLS 1.3",
}
OTHER_CHECKS = {ScanCommand.TLS_COMPRESSION, ScanCommand.SESSION_RENEGOTIATION}
AEAD_MARKERS = ("_GCM_", "_CHACHA20_POLY1305_", "_CCM")
FORWARD_SECRET_KX = ("TLS_ECDHE_", "TLS_DHE_")


def scan(port: int) -> ServerScanResult:
    location = ServerNetworkLocation(hostname="localhost", port=port, ip_address="127.0.0.1")
    request = ServerScanRequest(
        server_location=location,
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication="server.example.com", network_timeout=5
        ),
        scan_commands={*WEAK_PROTOCOLS, *GOOD_PROTOCOLS, *OTHER_CHECKS},
    )
    scanner = Scanner(per_server_concurrent_connections_limit=4)
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    return result


def attempt_result(result: ServerScanResult, command: ScanCommand) -> Any:
    """The scan command's result; a command that errored fails the test."""
    assert result.scan_result is not None
    attempt = getattr(result.scan_result, command.value)
    assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, (
        f"sslyze {command.value}: {attempt.status} {attempt.error_reason} {attempt.error_trace}"
    )
    return attempt.result


def weak_suite(name: str) -> bool:
    """Anything but an AEAD suite with an ephemeral key exchange (IANA names)."""
    if name.startswith("TLS_AES_") or name.startswith("TLS_CHACHA20_"):
        return False  # TLS 1.3: AEAD, and (EC)DHE always (no psk_ke without a PSK)
    aead = any(marker in name for marker in AEAD_MARKERS)
    return not (aead and name.startswith(FORWARD_SECRET_KX)) or "_anon_" in name


@pytest.mark.parametrize(
    ("suite", "weak"),
    [
        ("TLS_AES_128_GCM_SHA256", False),
        ("TLS_CHACHA20_POLY1305_SHA256", False),
        ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", False),
        ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", False),
        ("TLS_DHE_RSA_WITH_AES_128_CCM", False),
        ("TLS_RSA_WITH_AES_128_GCM_SHA256", True),  # no forward secrecy
        ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", True),  # not an AEAD
        ("TLS_ECDHE_ECDSA_WITH_RC4_128_SHA", True),
        ("TLS_DH_anon_WITH_AES_128_GCM_SHA256", True),  # no authentication
        ("TLS_RSA_WITH_3DES_EDE_CBC_SHA", True),
    ],
)
def test_weak_suite_rule(suite: str, weak: bool) -> None:
    """The rule the scan is judged by, on suites a weak server would accept."""
    assert weak_suite(suite) is weak


def test_scanner_finds_no_weak_protocol_or_cipher(start_proxy: StartProxy) -> None:
    pki = shared_pki()
    port = free_port()
    lis = https_listener(port, downstream_tls([pki.server_rsa, pki.server_ecdsa]))
    start_proxy(bootstrap(admin_port=free_port(), listeners=[lis], clusters=[]))

    result = scan(port)
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, (
        f"sslyze could not connect: {result.connectivity_status} {result.connectivity_error_trace}"
    )

    accepted: dict[str, list[str]] = {}
    for command, label in {**WEAK_PROTOCOLS, **GOOD_PROTOCOLS}.items():
        suites: CipherSuitesScanResult = attempt_result(result, command)
        accepted[label] = [s.cipher_suite.name for s in suites.accepted_cipher_suites]

    weak_protocols = {label: accepted[label] for label in WEAK_PROTOCOLS.values()}
    assert not any(weak_protocols.values()), f"weak protocol versions accepted: {weak_protocols}"
    weak = {
        label: [s for s in accepted[label] if weak_suite(s)] for label in GOOD_PROTOCOLS.values()
    }
    assert not any(weak.values()), f"weak cipher suites accepted: {weak}"
    assert accepted["TLS 1.2"] and accepted["TLS 1.3"], f"accepted: {accepted}"

    compression = attempt_result(result, ScanCommand.TLS_COMPRESSION)
    assert not compression.supports_compression
    renegotiation = attempt_result(result, ScanCommand.SESSION_RENEGOTIATION)
    assert not renegotiation.is_vulnerable_to_client_renegotiation_dos
    assert renegotiation.client_renegotiations_success_count == 0

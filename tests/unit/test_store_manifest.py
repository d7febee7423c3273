"""manifest.json: schema, path rules, ed25519 signatures (embedded and detached)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
)

from netbootd.store.manifest import (
    ManifestError,
    check_relpath,
    load_public_key,
    parse_manifest,
    sign_manifest,
    verify_signature,
)

SHA = "a" * 64


def good() -> dict:
    return {"image": "demo", "version": "2026.11.23-1", "created": "2026-11-23T13:00:00Z",
            "kind": "kernel+initrd", "boards": ["x86_64"],
            "boot": {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                     "cmdline": "console=ttyS0"},
            "artefacts": [{"path": "boot/vmlinuz", "size": 1, "sha256": SHA},
                          {"path": "boot/initrd.img", "size": 2, "sha256": SHA.upper()}]}


def test_parses_the_documented_example() -> None:
    m = parse_manifest(json.dumps(good()).encode())
    assert m.image == "demo" and m.kind == "kernel+initrd"
    assert m.total_size == 3
    assert m.artefacts[1].sha256 == SHA  # normalised to lower case
    assert m.boot_dict() == {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                             "cmdline": "console=ttyS0"}


@pytest.mark.parametrize("change, needle", [
    ({"kind": "floppy"}, "kind"),
    ({"image": "../etc"}, "image"),
    ({"version": ".hidden"}, "version"),
    ({"boards": []}, "boards"),
    ({"artefacts": [{"path": "/etc/passwd", "size": 1, "sha256": SHA}]}, "artefacts"),
    ({"artefacts": [{"path": "a/../../x", "size": 1, "sha256": SHA}]}, "artefacts"),
    ({"artefacts": [{"path": "x", "size": 1, "sha256": "zz"}]}, "sha256"),
    ({"artefacts": [{"path": "x", "size": 1, "sha256": SHA}] * 2}, "twice"),
    ({"artefacts": [{"path": "manifest.json", "size": 1, "sha256": SHA}]}, "artefact"),
    ({"surprise": 1}, "surprise"),
])
def test_rejects_bad_fields_with_a_reason(change: dict, needle: str) -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(json.dumps({**good(), **change}).encode())
    assert needle in str(exc.value)


def test_not_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{nope")
    with pytest.raises(ManifestError, match="object"):
        parse_manifest(b"[]")


def test_relpath_normalises_dots_and_rejects_escapes() -> None:
    assert check_relpath("./boot//vmlinuz") == "boot/vmlinuz"
    for bad in ("", "/x", "..", "a/../..", "a\\b"):
        with pytest.raises(ValueError):
            check_relpath(bad)


def test_embedded_signature_roundtrip(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_manifest(good(), key)
    data = json.dumps(signed, indent=2).encode()  # formatting does not matter: canonical form
    pub = tmp_path / "k.pem"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    assert verify_signature(data, None, [load_public_key(pub)]) == "embedded"
    tampered = json.dumps({**signed, "version": "evil"}).encode()
    with pytest.raises(ManifestError, match="does not verify"):
        verify_signature(tampered, None, [load_public_key(pub)])


def test_detached_signature_and_key_formats(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()
    data = json.dumps(good()).encode()
    sig = key.sign(data)
    raw = tmp_path / "k.b64"
    raw.write_text(base64.b64encode(key.public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)).decode())
    ssh = tmp_path / "k.pub"
    ssh.write_bytes(key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))
    for kf in (raw, ssh):
        k = load_public_key(kf)
        assert verify_signature(data, sig, [k]) == "detached"
        assert verify_signature(data, base64.b64encode(sig), [k]) == "detached"


def test_signature_required_but_missing_or_untrusted(tmp_path) -> None:
    data = json.dumps(good()).encode()
    other = Ed25519PrivateKey.generate()
    kf = tmp_path / "k.pem"
    kf.write_bytes(other.public_key().public_bytes(Encoding.PEM,
                                                   PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ManifestError, match="not signed"):
        verify_signature(data, None, [load_public_key(kf)])
    with pytest.raises(ManifestError, match="no trusted keys"):
        verify_signature(data, None, [])
    signed = json.dumps(sign_manifest(good(), Ed25519PrivateKey.generate())).encode()
    with pytest.raises(ManifestError, match="does not verify"):
        verify_signature(signed, None, [load_public_key(kf)])


def disk(**change) -> dict:
    d = {"path": "disk.img.zst", "compression": "zst", "size": 5, "sha256": SHA,
         "uncompressed_size": 100, "uncompressed_sha256": "b" * 64}
    return {"image": "os", "version": "1", "created": "2026-11-23T13:00:00Z", "kind": "disk",
            "boards": ["rpi5"], "artefacts": [{"path": "disk.img.zst", "size": 5,
                                               "sha256": SHA}],
            "disk": {**d, **change}}


def test_disk_section_parses_and_fills_boot_disk() -> None:
    m = parse_manifest(json.dumps(disk()).encode())
    assert m.kind == "disk" and m.disk.compression == "zst"
    assert m.disk.uncompressed_size == 100 and m.boot_dict() == {"disk": "disk.img.zst"}


def test_disk_image_is_the_old_name_of_disk() -> None:
    raw = disk()
    raw["kind"] = "disk-image"
    assert parse_manifest(json.dumps(raw).encode()).kind == "disk"


@pytest.mark.parametrize("change, needle", [
    ({"path": "other.img.zst"}, "not an artefact"),
    ({"compression": "xz"}, "does not match"),
    ({"size": 6}, "differ from the artefact"),
    ({"sha256": "c" * 64}, "differ from the artefact"),
    ({"uncompressed_sha256": "nothex"}, "64 hex"),
    ({"uncompressed_size": -1}, "uncompressed_size"),
    ({"compression": "bz2"}, "compression"),
    ({"extra": 1}, "extra"),
])
def test_disk_section_rules(change, needle) -> None:
    with pytest.raises(ManifestError, match=needle):
        parse_manifest(json.dumps(disk(**change)).encode())


@pytest.mark.parametrize("name, comp", [("a.img", "none"), ("d/a.img.zst", "zst"),
                                        ("a.img.xz", "xz"), ("a.img.gz", "gz")])
def test_disk_compression_follows_the_suffix(name, comp) -> None:
    raw = disk(path=name, compression=comp)
    raw["artefacts"][0]["path"] = name
    assert parse_manifest(json.dumps(raw).encode()).disk.compression == comp


def test_disk_file_must_be_named_as_an_image() -> None:
    raw = disk(path="disk.raw", compression="none")
    raw["artefacts"][0]["path"] = "disk.raw"
    with pytest.raises(ManifestError, match="must end in"):
        parse_manifest(json.dumps(raw).encode())


def test_disk_section_only_on_disk_builds() -> None:
    raw = {**good(), "disk": disk()["disk"]}
    raw["artefacts"].append(disk()["artefacts"][0])
    with pytest.raises(ManifestError, match="needs kind disk"):
        parse_manifest(json.dumps(raw).encode())

"""Artifacts by content: the cache's blob view, the upstream server, bundles (export, import)."""

from __future__ import annotations

import hashlib
import json
import tarfile
import urllib.request
from pathlib import Path

import pytest
from llmfleet.artifacts.blobs import Blob, export_bundle, import_bundle, link_blobs, lock_blobs, serve_in_thread
from llmfleet.artifacts.lockfile import read_lock, with_model, with_runtime, write_lock
from llmfleet.cli.pin import main
from llmfleet.pins import ArchFacts, FilePin, ModelPin, Requirement, RuntimePin

WHEEL, CONFIG, WEIGHTS = b"wheel bytes", b'{"a": 1}\n', bytes(range(256)) * 4096
FACTS = ArchFacts(architecture="LlamaForCausalLM", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=128, max_position_embeddings=4096)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def lock(tmp_path: Path, cache: Path) -> Path:
    """A lock with a runtime (one wheel) and a model (two files), all in the cache."""
    wheel = Requirement(name="fake", version="1", filename="fake-1-py3-none-any.whl", sha256=sha(WHEEL), size=len(WHEEL))
    runtime = RuntimePin(distribution="fake", version="1", python="3.11", device="cpu", platform="x86_64-manylinux_2_36",
                         requirements=[wheel])
    model = ModelPin(source="build:tiny-llama", revision="0" * 64, architecture=FACTS, files=[
        FilePin(path="config.json", sha256=sha(CONFIG), size=len(CONFIG)),
        FilePin(path="model.safetensors", sha256=sha(WEIGHTS), size=len(WEIGHTS)),
    ])
    path = tmp_path / "lock.json"
    write_lock(path, with_model(with_runtime(read_lock(path), "rt", runtime), "m", model))
    (cache / "wheelhouse" / "rt").mkdir(parents=True)
    (cache / "wheelhouse" / "rt" / "fake-1-py3-none-any.whl").write_bytes(WHEEL)
    (cache / "models" / "m").mkdir(parents=True)
    (cache / "models" / "m" / "config.json").write_bytes(CONFIG)
    (cache / "models" / "m" / "model.safetensors").write_bytes(WEIGHTS)
    return path


def test_the_blob_view_names_each_cached_file_by_its_sha256_without_copying(lock: Path, cache: Path) -> None:
    blobs = lock_blobs(read_lock(lock))
    names = [(b.kind, b.name) for b in blobs]
    assert names == [("model", "m/config.json"), ("model", "m/model.safetensors"), ("wheel", "rt/fake-1-py3-none-any.whl")]
    assert link_blobs(cache, blobs) == 3 and link_blobs(cache, blobs) == 0
    view = cache / "blobs" / "sha256" / sha(WEIGHTS)
    assert view.read_bytes() == WEIGHTS and view.stat().st_ino == (cache / "models" / "m" / "model.safetensors").stat().st_ino


def test_the_upstream_serves_blobs_with_range_and_nothing_else(lock: Path, cache: Path) -> None:
    link_blobs(cache, lock_blobs(read_lock(lock)))
    server = serve_in_thread([cache])
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/sha256/{sha(WEIGHTS)}") as r:
            assert r.status == 200 and r.read() == WEIGHTS
        req = urllib.request.Request(f"{base}/sha256/{sha(WEIGHTS)}", headers={"Range": "bytes=1000-"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 1000-{len(WEIGHTS) - 1}/{len(WEIGHTS)}"
            assert r.read() == WEIGHTS[1000:]
        for path in (f"/sha256/{'0' * 64}", "/models/m/config.json", "/sha256/../../etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + path)
            assert info.value.code == 404
    finally:
        server.shutdown()


def test_a_bundle_is_the_same_bytes_for_the_same_inputs_and_import_checks_every_blob(lock: Path, cache: Path, tmp_path: Path) -> None:
    blobs = lock_blobs(read_lock(lock))
    link_blobs(cache, blobs)
    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    for out in (one, two):
        export_bundle(out, blobs, [cache], lock.read_text(), {"site": "site-a"}, log=lambda _: None)
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert names[:2] == ["manifest.json", "lock.json"] and sorted(names[2:]) == names[2:]
    assert manifest["site"] == "site-a" and manifest["bytes"] == len(WHEEL) + len(CONFIG) + len(WEIGHTS)
    mirror = tmp_path / "mirror"
    report = import_bundle(one, mirror, log=lambda _: None)
    assert (report.blobs, report.added) == (3, 3) and (mirror / "sha256" / sha(WEIGHTS)).read_bytes() == WEIGHTS
    assert import_bundle(one, mirror, log=lambda _: None).added == 0  # already there: nothing rewritten


def test_a_bundle_with_a_changed_blob_is_refused_and_leaves_nothing_of_it(lock: Path, cache: Path, tmp_path: Path) -> None:
    blobs = lock_blobs(read_lock(lock))
    link_blobs(cache, blobs)
    good = tmp_path / "good.tar"
    export_bundle(good, blobs, [cache], lock.read_text(), {}, log=lambda _: None)
    raw = bytearray(good.read_bytes())
    at = raw.index(WEIGHTS[:4096])  # the first bytes of the weights in the archive
    raw[at + 10] ^= 0xFF
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    mirror = tmp_path / "mirror"
    from llmfleet.artifacts.cache import MismatchError

    with pytest.raises(MismatchError, match=f"blobs/sha256/{sha(WEIGHTS)} has sha256"):
        import_bundle(bad, mirror, log=lambda _: None)
    assert not (mirror / "sha256" / sha(WEIGHTS)).exists() and not list((mirror / "sha256").glob(".*"))


def test_export_refuses_a_blob_the_cache_lacks(lock: Path, cache: Path, tmp_path: Path) -> None:
    missing = Blob("f" * 64, 3, "model", "m/gone.bin")
    with pytest.raises(Exception, match=r"1 pinned file\(s\) are not in the cache, e.g. m/gone.bin"):
        export_bundle(tmp_path / "b.tar", [missing], [cache], "{}", {}, log=lambda _: None)
    assert not (tmp_path / "b.tar").exists()


def test_bundle_cli_export_limit_import_round_trip(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The lab fleet's inventory: one site's bundle holds its runtime's wheels and its models."""
    repo = Path(__file__).resolve().parents[3]
    out = tmp_path / "site-b.tar"
    assert main(["bundle", "export", "-i", str(repo / "inventory" / "lab-fleet"), "--limit", "nowhere", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--limit nowhere: no host of" in err and "(sites: site-a, site-b)" in err
    assert main(["bundle", "export", "-i", str(repo / "inventory" / "lab-fleet"), "--limit", "site-b", "-o", str(out)]) == 1
    assert "are not in the cache" in capsys.readouterr().err and not out.exists()  # an empty cache: nothing fetched yet


def test_a_cached_file_of_another_pin_is_not_linked_under_this_pins_name(lock: Path, cache: Path) -> None:
    blobs = lock_blobs(read_lock(lock))
    (cache / "models" / "m" / "config.json").write_bytes(b'{"a": 2}\n')  # same size, another revision's content
    assert link_blobs(cache, blobs) == 2
    assert not (cache / "blobs" / "sha256" / sha(CONFIG)).exists()

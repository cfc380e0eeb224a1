"""Remote stores over s3:// against a local S3-compatible server (moto, on 127.0.0.1 only), including a server
that goes away in the middle of a write and of a read.

The server is reached the way the CLI reaches one: fsspec's configuration for the ``s3`` protocol, which fsspec
fills from ``FSSPEC_S3_ENDPOINT_URL`` when it is imported (set here in ``fsspec.config.conf`` directly, since
fsspec is already imported; one test runs the CLI in a subprocess with the environment variable). botocore's
retries are off (``total_max_attempts`` 1) so that an unreachable server fails at once instead of after backoff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import fsspec  # noqa: E402

from kd_pipeline.data import Manifest, ShardBuilder, ShardData, StoreWriter, open_store, verify_store  # noqa: E402
from kd_pipeline.data.errors import CorruptShardError, StoreError, StoreWriteError  # noqa: E402
from kd_pipeline.data.reader import StoreReadError  # noqa: E402
from tests.conftest import make_manifest, random_example, write_store  # noqa: E402
from tests.test_store import assert_same  # noqa: E402

BUCKET = "kd-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class S3Server:
    """A moto S3 server on a free loopback port that a test can stop and start again (its objects survive)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False

    def start(self) -> None:
        if not self.running:
            self._server.start()
            self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    import boto3
    import s3fs

    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        server = S3Server()
        server.start()
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
        conf = {"endpoint_url": server.endpoint, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        mp.setitem(fsspec.config.conf, "s3", conf)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield server
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()
            werkzeug.setLevel(level)


@pytest.fixture
def running(s3: S3Server) -> Iterator[S3Server]:
    """The server, running at the start of the test and again at its end whatever the test did."""
    s3.start()
    yield s3
    s3.start()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify_store and the CLI cache remote shards under $KD_PIPELINE_CACHE: keep them in the test's folder."""
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path / "default-cache"))


def _shard(rng: np.random.Generator, m: Manifest, rows: int = 5) -> tuple[ShardData, list[dict[str, Any]]]:
    b = ShardBuilder(m.task, m.targets)
    examples = [random_example(rng, m.task, m.targets, m.vocab_size) for _ in range(rows)]
    for ex in examples:
        b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
    return b.build(), examples


def _stop_on_call(s3: S3Server, method: Callable[..., Any], n: int) -> Callable[..., Any]:
    """``method``, but the server stops just before its n-th call (so that call, and every later one, fails)."""
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            s3.stop()
        return method(*args, **kwargs)

    return wrapped


def _counting(method: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    def wrapped(rpath: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(rpath)
        return method(rpath, *args, **kwargs)

    return wrapped


# ---------------------------------------------------------------- round trip and the local cache


def test_write_read_verify_and_read_again_from_cache(running: S3Server, tmp_path: Path, backend: str) -> None:
    url = f"s3://{BUCKET}/round-trip-{backend}"
    written = write_store(url, backend, shards=2)  # type: ignore[arg-type]
    store = open_store(url, cache_dir=tmp_path / "cache")
    assert len(store) == 10 and store.manifest.backend == backend
    for r, w in zip(store, written, strict=True):
        assert_same(r, w, "causal-lm", store.manifest.targets)
    report = verify_store(url)
    assert report.ok, report.problems
    assert report.shards_checked == 2

    # a second reader of the same URL downloads nothing: with the server gone it still reads every example
    again = open_store(url, cache_dir=tmp_path / "cache")
    running.stop()
    for r, w in zip(again, written, strict=True):
        assert_same(r, w, "causal-lm", again.manifest.targets)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached and not [p for p in cached if p.name.endswith(".part")]


@pytest.mark.parametrize("options", ["endpoint_url", "client_kwargs"])
def test_storage_options_reach_the_endpoint(
    running: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str
) -> None:
    """Without fsspec's configuration, storage_options alone point s3:// at the server."""
    url = f"s3://{BUCKET}/options-{options}"
    write_store(url, "arrow", shards=1)  # type: ignore[arg-type]
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    so: dict[str, Any] = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    if options == "endpoint_url":
        so["endpoint_url"] = running.endpoint
    else:
        so["client_kwargs"] = {"endpoint_url": running.endpoint}
    assert len(list(open_store(url, storage_options=so, cache_dir=tmp_path / "c"))) == 5
    assert verify_store(url, storage_options=so).ok


def test_cli_reaches_the_endpoint_through_the_environment(running: S3Server, tmp_path: Path) -> None:
    """`FSSPEC_S3_ENDPOINT_URL` (read by fsspec at import) is all the CLI needs for an S3-compatible server."""
    url = f"s3://{BUCKET}/cli"
    write_store(url, "zarr", shards=2)  # type: ignore[arg-type]
    env = {**os.environ, **CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": running.endpoint}
    env["KD_PIPELINE_CACHE"] = str(tmp_path / "cli-cache")
    cmd = [sys.executable, "-m", "kd_pipeline", "verify", "--json", url]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["ok"] is True


# ---------------------------------------------------------------- the server goes away


@pytest.mark.parametrize(
    ("backend", "when"),
    [("zarr", "uploading the shard"), ("arrow", "uploading the shard"), ("arrow", "replacing the manifest")],
)
def test_server_gone_mid_write_then_the_same_writer_resumes(
    running: S3Server, monkeypatch: pytest.MonkeyPatch, backend: str, when: str
) -> None:
    url = f"s3://{BUCKET}/mid-write-{backend}-{when.split()[0]}"
    m = make_manifest(backend)
    rng = np.random.default_rng(0)
    shards = [_shard(rng, m) for _ in range(3)]
    writer = StoreWriter(url, m)
    for unit in (0, 1):
        writer.write_shard(unit, shards[unit][0])
    fs = writer.location.fs
    if when == "uploading the shard":  # zarr: after the shard's first file is up; arrow: before its only file
        monkeypatch.setattr(fs, "put_file", _stop_on_call(running, fs.put_file, 2 if backend == "zarr" else 1))
    else:
        # the shard's record segment is PUT first, then the root that names it: the server stops before the root
        monkeypatch.setattr(fs, "pipe_file", _stop_on_call(running, fs.pipe_file, 2))
    with pytest.raises(StoreWriteError, match=rf"writing shard-000002 to {url} failed .*2 shards committed") as info:
        writer.write_shard(2, shards[2][0])
    assert isinstance(info.value, OSError) and "127.0.0.1" in str(info.value)  # names the endpoint it could not reach
    writer.close()
    monkeypatch.undo()

    # while it is down: clear errors on opening, for writing and for reading
    with pytest.raises(StoreWriteError, match=f"opening {url} for writing failed"):
        StoreWriter(url, m)
    with pytest.raises(StoreReadError, match=f"{url}: reading manifest.json failed"):
        open_store(url)

    running.start()
    partial = open_store(url, allow_incomplete=True)
    assert len(partial) == 10  # the two committed shards, intact; shard 2 does not exist for readers
    for r, w in zip(partial, shards[0][1] + shards[1][1], strict=True):
        assert_same(r, w, "causal-lm", m.targets)
    report = verify_store(url)
    assert not report.complete and all("shard-000000" not in p and "shard-000001" not in p for p in report.problems)

    with StoreWriter(url, m) as again:  # the same command again: resumes after the last commit
        assert again.committed_units == {0, 1}
        again.write_shard(2, shards[2][0])
        again.finish()
    assert verify_store(url).ok
    store = open_store(url)
    for r, w in zip(store, [ex for _, exs in shards for ex in exs], strict=True):
        assert_same(r, w, "causal-lm", m.targets)


def test_server_gone_mid_read_then_a_reopen_resumes(
    running: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url = f"s3://{BUCKET}/mid-read-{backend}"
    written = write_store(url, backend, shards=2)  # type: ignore[arg-type]
    cache = tmp_path / "cache"
    store = open_store(url, cache_dir=cache)
    store[0]  # shard 0 downloaded
    fs = store.location.fs
    # zarr: the server goes away after the first of shard 1's files is down; arrow: before its only file
    monkeypatch.setattr(fs, "get_file", _stop_on_call(running, fs.get_file, 2 if backend == "zarr" else 1))
    with pytest.raises(StoreReadError, match=rf"{url}: reading shard-000001 failed") as info:
        store[5]
    assert isinstance(info.value, StoreError) and isinstance(info.value, OSError)
    monkeypatch.undo()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]  # nothing half-downloaded is kept

    running.start()
    downloads: list[str] = []
    monkeypatch.setattr(fs, "get_file", _counting(fs.get_file, downloads))
    reopened = open_store(url, cache_dir=cache)
    for r, w in zip(reopened, written, strict=True):
        assert_same(r, w, "causal-lm", reopened.manifest.targets)
    per_shard = [len(s.files) for s in reopened.manifest.shards]
    already = 1 if backend == "zarr" else 0  # the file that was down before the server went away
    assert len(downloads) == per_shard[1] - already
    assert not any("shard-000000" in d for d in downloads)


def test_verify_reads_each_remote_file_once_and_catches_a_flipped_byte(
    running: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    from kd_pipeline.data.location import Location

    url = f"s3://{BUCKET}/verify-once-{backend}"
    write_store(url, backend, shards=2)  # type: ignore[arg-type]
    open_store(url)[0]  # a reader fills the default cache first: verify must not trust that copy
    reads: list[str] = []
    for name in ("download", "read_bytes", "sha256"):
        monkeypatch.setattr(Location, name, _counting_method(getattr(Location, name), reads))
    report = verify_store(url)
    assert report.ok, report.problems
    shard_reads = [r for r in reads if r.startswith("shards/")]
    assert sorted(shard_reads) == sorted(set(shard_reads)) and len(shard_reads) == report.files_checked
    # a flipped byte in one remote object (same size) is found, and named
    fs, root = fsspec.core.url_to_fs(url)
    victim = sorted(p for p in fs.find(f"{root}/shards") if "shard-000001" in p and not p.endswith("zarr.json"))[-1]
    raw = bytearray(fs.cat_file(victim))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(raw))
    report = verify_store(url)
    assert not report.ok and len(report.problems) == 1
    assert "shard-000001" in report.problems[0] and "checksum" in report.problems[0]


def test_remote_verify_holds_at_most_one_shard_on_disk(
    running: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """verify_store streams a remote store shard by shard: at every download, the verify folder holds no more
    than one shard's files (never a copy of the store), and a flipped byte is still caught."""
    from kd_pipeline.data.location import Location

    url = f"s3://{BUCKET}/verify-bounded-{backend}"
    write_store(url, backend, shards=4, rows=20)  # type: ignore[arg-type]
    m = open_store(url).manifest
    largest = max(sum(f.bytes for f in s.files.values()) for s in m.shards)
    held: list[int] = []
    real = Location.download

    def download(self: Location, rel: str, dest: Path) -> None:
        real(self, rel, dest)
        root = next(p for p in dest.parents if p.name.startswith("kd-verify-"))
        held.append(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()))

    monkeypatch.setattr(Location, "download", download)
    assert verify_store(url).ok
    assert len(held) == sum(len(s.files) for s in m.shards) and 0 < max(held) <= largest
    fs, root = fsspec.core.url_to_fs(url)
    victim = sorted(p for p in fs.find(f"{root}/shards") if "shard-000002" in p and not p.endswith("zarr.json"))[-1]
    raw = bytearray(fs.cat_file(victim))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(raw))
    report = verify_store(url)
    assert len(report.problems) == 1 and "shard-000002" in report.problems[0]


def _counting_method(method: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    def wrapped(self: Any, rel: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(rel)
        return method(self, rel, *args, **kwargs)

    return wrapped


def test_a_claimed_terabyte_object_is_refused_before_downloading(
    running: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{BUCKET}/terabyte"
    write_store(url, "arrow", shards=1)  # type: ignore[arg-type]
    fs, root = fsspec.core.url_to_fs(url)
    raw = json.loads(fs.cat_file(f"{root}/manifest.json"))
    ref = raw["segments"][0]  # a consistent forgery: the segment's checksum in the root matches the edit
    segment = json.loads(fs.cat_file(f"{root}/{ref['path']}"))
    segment["shards"][0]["files"]["shard-000000.arrow"]["bytes"] = 10**12
    body = json.dumps(segment).encode()
    fs.pipe_file(f"{root}/{ref['path']}", body)
    ref["bytes"], ref["sha256"] = len(body), hashlib.sha256(body).hexdigest()
    fs.pipe_file(f"{root}/manifest.json", json.dumps(raw).encode())
    downloads: list[str] = []
    monkeypatch.setattr(fs, "get_file", _counting(fs.get_file, downloads))
    with pytest.raises(CorruptShardError, match=r"shard-000000: file .* has \d+ bytes, the manifest says 10{12}"):
        open_store(url, cache_dir=tmp_path / "cache")[0]
    assert downloads == []

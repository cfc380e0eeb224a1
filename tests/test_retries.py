"""Transient remote errors are retried with backoff, permanent ones are not (data/location.py).

Faults are injected into the real s3fs filesystem talking to the moto server of tests/test_remote.py: its
methods are wrapped so that their first calls fail as a flaky network would, then go through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

import botocore.exceptions
import s3fs.errors

from kd_pipeline.data import location, open_store
from kd_pipeline.data.errors import StoreReadError
from tests.conftest import write_store
from tests.test_remote import BUCKET, _isolated_cache, running, s3  # noqa: F401  (fixtures)


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response: Any = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "PutObject")


def _flaky(method: Callable[..., Any], failures: int, error: Callable[[], BaseException]) -> Callable[..., Any]:
    """``method``, whose first ``failures`` calls raise ``error()``; counts every call in ``wrapped.calls``."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        wrapped.calls += 1  # type: ignore[attr-defined]
        if wrapped.calls <= failures:  # type: ignore[attr-defined]
            raise error()
        return method(*args, **kwargs)

    wrapped.calls = 0  # type: ignore[attr-defined]
    return wrapped


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(location, "RETRY_BASE_S", 0.001)


def test_transient_errors_are_classified() -> None:
    assert location.is_transient(ConnectionResetError())
    assert location.is_transient(TimeoutError())
    assert location.is_transient(_client_error("SlowDown", 503))
    assert location.is_transient(_client_error("InternalError", 500))
    assert location.is_transient(s3fs.errors.translate_boto_error(_client_error("SlowDown", 503)))
    assert location.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert not location.is_transient(s3fs.errors.translate_boto_error(_client_error("NoSuchKey", 404)))
    assert not location.is_transient(s3fs.errors.translate_boto_error(_client_error("AccessDenied", 403)))
    assert not location.is_transient(_client_error("PreconditionFailed", 412))
    assert not location.is_transient(FileNotFoundError())
    assert not location.is_transient(ValueError("a bug"))


@pytest.mark.usefixtures("running")
def test_a_flaky_server_is_retried_for_writes_and_reads(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    url = f"s3://{BUCKET}/flaky-{backend}"
    fs = location.Location(url).fs
    pipe = _flaky(fs.pipe_file, 3, lambda: _client_error("SlowDown", 503))  # root and segment PUTs
    put = _flaky(fs.put_file, 2, lambda: ConnectionResetError("connection reset by peer"))  # shard files
    monkeypatch.setattr(fs, "pipe_file", pipe)
    monkeypatch.setattr(fs, "put_file", put)
    written = write_store(url, backend, shards=2)  # type: ignore[arg-type]
    assert pipe.calls > 3 and put.calls > 2  # type: ignore[attr-defined]
    # on the class: a fresh reader may hold another instance of the filesystem
    cat = _flaky(type(fs).cat_file, location.RETRY_ATTEMPTS - 1, lambda: TimeoutError("read timed out"))
    monkeypatch.setattr(type(fs), "cat_file", cat)
    reader = open_store(url)
    assert len(reader) == len(written) and reader.manifest.complete
    assert cat.calls == location.RETRY_ATTEMPTS  # type: ignore[attr-defined]


@pytest.mark.usefixtures("running")
def test_retries_are_bounded_and_permanent_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{BUCKET}/permanent"
    write_store(url, "arrow", shards=1)  # type: ignore[arg-type]
    fs = location.Location(url).fs
    down = _flaky(type(fs).cat_file, 100, lambda: ConnectionRefusedError("connection refused"))
    monkeypatch.setattr(type(fs), "cat_file", down)
    with pytest.raises(StoreReadError, match=f"{url}: reading manifest.json failed .*connection refused"):
        open_store(url)
    assert down.calls == location.RETRY_ATTEMPTS  # type: ignore[attr-defined]
    denied = _flaky(
        s3fs.S3FileSystem.cat_file, 100, lambda: s3fs.errors.translate_boto_error(_client_error("AccessDenied", 403))
    )
    monkeypatch.setattr(type(fs), "cat_file", denied)
    with pytest.raises(StoreReadError, match="reading manifest.json failed"):
        open_store(url)
    assert denied.calls == 1  # type: ignore[attr-defined]

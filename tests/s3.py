"""A real S3-compatible server on loopback (moto in server mode) for object-store tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from raylens.llm.server import free_loopback_port


@contextlib.contextmanager
def s3_server(bucket: str = "raylens-test") -> Iterator[str]:
    """Start moto's S3 server on a free loopback port with ``bucket`` created; yield the URI
    query string that points pyarrow at it (``?endpoint_override=...&scheme=http``). The AWS
    credentials it accepts are set in the environment (Ray workers inherit them)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_loopback_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(bucket)
        yield query
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

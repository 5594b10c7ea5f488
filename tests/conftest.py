"""Shared pytest fixtures. Keep only generic ones here; topic fixtures live beside their tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sslmm_ray import storage
from sslmm_ray.devtools.s3server import FAKE_CREDENTIALS, S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3 server process (moto) on 127.0.0.1 with one bucket, for the whole session.

    While it runs, the environment points the AWS chain at moto's fake credentials and
    ``SSLMM_S3_ENDPOINT`` at the server, as a user's shell would; both are restored afterwards.
    Use ``s3.uri(prefix)`` with a prefix unique to the test, since the bucket is shared.
    """
    env = {**FAKE_CREDENTIALS}
    saved = {k: os.environ.get(k) for k in [*env, "SSLMM_S3_ENDPOINT"]}
    server = start_s3_server()
    env["SSLMM_S3_ENDPOINT"] = server.endpoint
    os.environ.update(env)
    storage.clear_cache()
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage.clear_cache()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """One local Ray for the whole session (``ray.init`` costs ~10 s); shut down at the end.

    Modules that need Ray take this fixture instead of calling ``ray.init`` themselves, so the
    suite pays for one start. Logical CPUs exceed the 2 cores on purpose (see ``ray_env``).
    It starts after the S3 server so that its workers inherit the AWS chain's environment,
    as workers on a real node inherit that node's credentials.
    """
    import ray

    from sslmm_ray import ray_env

    info = ray_env.init(num_cpus=6)
    try:
        yield info
    finally:
        ray.shutdown()

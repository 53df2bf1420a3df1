"""A pytest plugin for the runs of the core suite against PostgreSQL and Redis
(``make pytest-scaleout`` loads it with ``-p tests.scaleout_plugin``).

pytest-asyncio gives every test an event loop of its own, while Channels keeps
one channel layer object per process. The Redis layer binds its connection
pools and its receive lock to the loop that first used them, so a test that
reused the previous test's layer could wait forever on a lock that belonged to
a closed loop. Each test therefore gets a fresh layer object (the server's
data stays: every channel name is random).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
from channels.layers import channel_layers

# A receive that is cancelled (a consumer disconnecting) waits for its BZPOPMIN
# to return: 5 s each by default, which the tests pay at every disconnect.
importlib.import_module("channels_redis.core").RedisChannelLayer.brpop_timeout = 1


@pytest.fixture(autouse=True)
def _fresh_channel_layer() -> Iterator[None]:
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()

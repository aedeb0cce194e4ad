"""Typed application state (aiohttp AppKeys)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from aiohttp import web

from ai.base import Provider
from storage.postgres import Database
from storage.redis_store import RedisStore

from .auth import TokenVerifier
from .chat import ChatService
from .lti import JwksCache
from .metrics import Metrics
from .peer import WebSocketPeer
from .settings import Settings


@dataclass
class ProcessState:
    """What the replica is doing: serving, or draining before it stops."""

    draining: bool = False
    metrics_port: int | None = None


SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", ProcessState)
DATABASE = web.AppKey("database", Database)
REDIS = web.AppKey("redis", RedisStore)
PROVIDER = web.AppKey("provider", Provider)
CHAT = web.AppKey("chat", ChatService)
METRICS = web.AppKey("metrics", Metrics)
VERIFIER = web.AppKey("verifier", TokenVerifier)
LTI_KEYS = web.AppKey("lti_keys", JwksCache)
SOCKETS: web.AppKey[weakref.WeakSet[WebSocketPeer]] = web.AppKey("sockets")

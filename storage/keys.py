"""Every Redis key and channel the product uses, built in one place under a configurable prefix.

Keys about one conversation share the hash tag `{c:<id>}` so that multi-key scripts work on a Redis
Cluster; per-user keys are tagged by user.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "smartedu:"

    def conversation_seq(self, conversation_id: str) -> str:
        return f"{self.prefix}{{c:{conversation_id}}}:seq"

    def conversation_log(self, conversation_id: str) -> str:
        return f"{self.prefix}{{c:{conversation_id}}}:log"

    def conversation_channel(self, conversation_id: str) -> str:
        return f"{self.prefix}{{c:{conversation_id}}}:events"

    def rate_limit(self, tenant_id: str, user_id: str) -> str:
        return f"{self.prefix}{{u:{tenant_id}:{user_id}}}:rate"

    def health(self) -> str:
        return f"{self.prefix}health"

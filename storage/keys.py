"""Every Redis key and channel the product uses, built in one place under a configurable prefix.

Keys about one conversation share the hash tag `{c:<id>}`, presence keys of a course share
`{p:<tenant>:<course>}` and per-user keys share `{u:<tenant>:<user>}`, so that multi-key scripts work
on a Redis Cluster. Channels are not keys; they only need to be unique.
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

    def conversation_log_start(self, conversation_id: str) -> str:
        return f"{self.prefix}{{c:{conversation_id}}}:logstart"

    def conversation_nodes(self, conversation_id: str) -> str:
        """Set: the replicas (node ids) with a socket in the conversation, which its frames are published to."""
        return f"{self.prefix}{{c:{conversation_id}}}:nodes"

    def answer_text(self, conversation_id: str, reply_id: int) -> str:
        """String: the text of an answer being generated, as its token frames carried it (never trimmed, unlike
        the log), while the answer runs; read by a takeover."""
        return f"{self.prefix}{{c:{conversation_id}}}:answer:{reply_id}:text"

    def answer_owner(self, conversation_id: str, reply_id: int) -> str:
        """String: the node id of the replica that started the answer, or "!" once another replica took it
        over; frames of the answer from any other replica are refused."""
        return f"{self.prefix}{{c:{conversation_id}}}:answer:{reply_id}:owner"

    def node_channel(self, node: str) -> str:
        """The channel one replica listens on for other replicas' frames of the conversations it holds."""
        return f"{self.prefix}node:{node}"

    def course_channel(self, tenant_id: str, course_id: str) -> str:
        return f"{self.prefix}{{p:{tenant_id}:{course_id}}}:events"

    def presence(self, tenant_id: str, course_id: str) -> str:
        """Sorted set: session id -> expiry (ms since the epoch)."""
        return f"{self.prefix}{{p:{tenant_id}:{course_id}}}:online"

    def presence_info(self, tenant_id: str, course_id: str) -> str:
        """Hash: session id -> JSON description of the session."""
        return f"{self.prefix}{{p:{tenant_id}:{course_id}}}:sessions"

    def rate_limit(self, tenant_id: str, user_id: str) -> str:
        # Tagged by tenant so one script can rate-limit and reserve budgets on a Redis Cluster.
        return f"{self.prefix}{{t:{tenant_id}}}:user:{user_id}:rate"

    def tenant_tokens(self, tenant_id: str, day: str) -> str:
        return f"{self.prefix}{{t:{tenant_id}}}:tokens:{day}"

    def user_tokens(self, tenant_id: str, user_id: str, day: str) -> str:
        # Tagged by tenant, not user, so one script can check both budgets on a Redis Cluster.
        return f"{self.prefix}{{t:{tenant_id}}}:user:{user_id}:tokens:{day}"

    def leases(self) -> str:
        """Sorted set of answers being generated: member -> lease expiry (ms since the epoch)."""
        return f"{self.prefix}leases"

    def control_channel(self) -> str:
        return f"{self.prefix}control"

    def revoked_session(self, session_id: str) -> str:
        """Present while a logged-out cookie session would otherwise still be valid."""
        return f"{self.prefix}session:{session_id}:revoked"

    def revocations_loaded(self) -> str:
        """Present once Redis holds every logout recorded in PostgreSQL: gone with a Redis that lost its data."""
        return f"{self.prefix}revocations:loaded"

    def revocations_loading(self) -> str:
        """Held by the replica copying the logouts from PostgreSQL into a Redis that lost them."""
        return f"{self.prefix}revocations:loading"

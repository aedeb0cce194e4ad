"""Persistence: PostgreSQL (asyncpg) for durable state, Redis (redis.asyncio) for shared live state."""

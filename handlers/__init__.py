"""Thin aiohttp adapters: parse the request, call the core, shape the reply."""

"""The load tester behind `smartedu loadtest`: simulated students speaking WebSocket protocol v1."""

from __future__ import annotations

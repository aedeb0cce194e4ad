"""Fixtures for the browser tests: one headless Chromium per test (see helpers.py)."""

from tests.e2e.helpers import browser  # noqa: F401  (a fixture, found here by every module)

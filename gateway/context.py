"""Typed per-request storage keys shared by the pipeline (app.py) and the proxy."""

from __future__ import annotations

from aiohttp import web

ROUTE = web.RequestKey("svidgate_route", str)
CANONICAL_PATH = web.RequestKey("svidgate_canonical_path", str)
UPSTREAM = web.RequestKey("svidgate_upstream", str)
UPSTREAM_SECONDS = web.RequestKey("svidgate_upstream_seconds", float)
STREAMING = web.RequestKey("svidgate_streaming", bool)

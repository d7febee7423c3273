"""Status page (placeholder until the template lands)."""

from __future__ import annotations

from aiohttp import web


def setup(web_app: web.Application) -> None:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text="netbootd", content_type="text/html")

    web_app.router.add_get("/", index)

"""The web UI's pages (a placeholder: the UI is built beside the API)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from .app import WebContext


def routes(context: WebContext) -> list[BaseRoute]:
    return []

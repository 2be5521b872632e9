"""Which route the REST router picks for a path: a fixed path is never taken for an id, and
the unserved routes, listed first, shadow no served one."""

from __future__ import annotations

import re
from typing import cast

import pytest
from starlette.routing import Route

from server.rest import routes
from server.rest.app import route_of
from server.rest.routing import Services, build_app

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
APP = build_app(routes(), cast(Services, None))
ROUTES = [r for r in APP.routes if isinstance(r, Route)]


def _first(path: str, method: str) -> Route | None:
    # The route Starlette's router picks (route_of, as the app finds a refused request's).
    scope = {"type": "http", "path": path, "root_path": "", "method": method}
    return cast(Route | None, route_of(APP, scope))


FIXED = sorted({r.path for r in ROUTES if "{" not in r.path})


@pytest.mark.parametrize("path", FIXED)
def test_a_fixed_path_is_its_own_route_for_every_method(path: str) -> None:
    # /api/v2/sessions/end and /api/v2/sessions/search were read as session ids by
    # /api/v2/sessions/{session_id} for the methods they do not serve (GET, PATCH).
    for method in METHODS:
        chosen = _first(path, method)
        assert chosen is not None and chosen.path == path, (method, chosen and chosen.path)


@pytest.mark.parametrize("route", [r for r in ROUTES if r.methods], ids=lambda r: r.path)
def test_every_route_is_reached_by_its_own_paths_and_methods(route: Route) -> None:
    # A value in each parameter ("a/b" for a :path one, else "x"): no route
    # listed before it (the unserved ones come first) takes its paths.
    path = re.sub(r"{\w+:path}", "a/b", route.path)
    path = re.sub(r"{\w+}", "x", path)
    for method in sorted((route.methods or set()) - {"HEAD"}):
        chosen = _first(path, method)
        assert chosen is route, (method, path, chosen and chosen.path)

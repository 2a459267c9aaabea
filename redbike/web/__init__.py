"""``redbike serve``: the REST API (api.py), the web UI (ui.py) and the
Prometheus metrics (metrics.py) on one Starlette app (app.py).

An optional extra (``pip install 'redbike[web]'``): nothing outside this
package imports Starlette, uvicorn, Jinja2 or prometheus_client, so the
core install and the daemons stay small.
"""

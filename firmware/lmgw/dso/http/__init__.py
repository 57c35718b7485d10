"""The DSO's operator HTTP API (docs/operator-api.md): aiohttp over HTTPS with operator client certificates.

``app`` builds the application and is the seam for route modules; ``routes`` holds the core
endpoints; ``service`` starts it beside the gateway listener.  Needs the ``dso`` extra.
"""

"""L7 forwarding: HTTP requests balanced one by one across a route's endpoints.

``heads`` holds the pure rules for message heads, ``exchange`` one request in flight
and the contract between a downstream and an upstream connection, ``h1`` the
HTTP/1.x Protocols.
"""

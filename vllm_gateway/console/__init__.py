"""The web console at /console/: a page for the people who run the box (docs/console.md).

session.py turns a key pasted once into a signed cookie that the front (access.py) accepts in place of
the key; routes.py serves the sign-in, the pages and their static files. Everything the pages show
or change goes through the ordinary API (api.py), so the console has no logic of its own for keys,
usage or models.
"""

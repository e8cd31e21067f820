"""The web console: plain HTML, ES modules and CSS under static/, served by the API at
/console/ (routes.py) without authentication, since the files hold no data. Everything
the pages show comes from the API with a session token, under the caller's policies."""

"""The operations console at /console: server-rendered pages over the API's own code paths.

- `sessions.py`: server-side sessions behind an HttpOnly cookie, for API keys with `ops`;
  CSRF tokens tied to each session.
- `web.py`: the pages' rendering (Jinja2, autoescaped), security headers, formatting
  helpers and Temporal UI links.
- `api/routers/console.py`: the routes, which call the same functions as the JSON API.
"""

"""The operator console at /console (off unless `console` is configured): one server-rendered
page of the gateway's state, behind its own credentials, with a CSRF-safe replay button.

`routes` wires it, `auth` checks the console login and CSRF tokens, `page` renders the HTML,
`recent` keeps the last requests (fed by `bc_proxy.edge`) with phone numbers masked.
"""

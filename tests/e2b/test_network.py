"""Sandbox ports reached through nook's preview proxy, and E2B's network options, with the unmodified SDK.

The SDK's `get_host(port)` names `{port}-{id}.{domain}`; the tests send that as the Host header to nook's own
address (the suite's server has the preview domain `nook.test`), as a wildcard DNS record would route it.
"""

import os

import httpx
from e2b import Sandbox

from conftest import eventually

SITE = "/home/user/site"


def fetch(sbx, port, headers=None):
    """GET / of a sandbox port through nook, addressed by the SDK's host name for it."""
    return httpx.get(
        os.environ["E2B_API_URL"] + "/",
        headers={"Host": sbx.get_host(port), **(headers or {})},
        timeout=10,
    )


def serve(sbx, port, text):
    sbx.files.write(f"{SITE}/index.html", text)
    sbx.commands.run(f"python3 -m http.server {port} --bind 127.0.0.1 --directory {SITE}", background=True)


def test_ports_are_public_by_default(sandbox):
    serve(sandbox, 8000, "hello from the sandbox")
    assert sandbox.get_host(8000) == f"8000-{sandbox.sandbox_id}.nook.test"
    response = eventually(lambda: (r := fetch(sandbox, 8000)).status_code == 200 and r, "the server answers")
    assert response.text == "hello from the sandbox"
    # A port nothing listens on is a gateway error naming the port, not a hang.
    closed = fetch(sandbox, 8001)
    assert closed.status_code == 502
    assert "8001" in closed.text


def test_mask_request_host_is_the_host_servers_see():
    sbx = Sandbox.create(timeout=300, network={"mask_request_host": "localhost:${PORT}"})
    try:
        script = (
            "import http.server, json\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        body = json.dumps({'host': self.headers['Host']}).encode()\n"
            "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
            "        self.wfile.write(body)\n"
            "http.server.HTTPServer(('127.0.0.1', 8000), H).serve_forever()\n"
        )
        sbx.files.write("/home/user/host.py", script)
        sbx.commands.run("python3 /home/user/host.py", background=True)
        response = eventually(lambda: (r := fetch(sbx, 8000)).status_code == 200 and r, "the server answers")
        assert response.json() == {"host": "localhost:8000"}
    finally:
        sbx.kill()


def test_private_traffic_needs_the_traffic_access_token():
    sbx = Sandbox.create(timeout=300, network={"allow_public_traffic": False})
    try:
        token = sbx.traffic_access_token
        assert token
        serve(sbx, 8000, "private page")
        header = {"e2b-traffic-access-token": token}
        response = eventually(lambda: (r := fetch(sbx, 8000, header)).status_code == 200 and r, "the server answers")
        assert response.text == "private page"
        assert fetch(sbx, 8000).status_code == 401
        assert fetch(sbx, 8000, {"e2b-traffic-access-token": "0" * len(token)}).status_code == 401
    finally:
        sbx.kill()


def test_egress_lists_and_internet_access_become_nook_policies():
    api = os.environ["E2B_API_URL"]
    native = {"Authorization": f"Bearer {os.environ['E2B_API_KEY']}"}
    listed = Sandbox.create(timeout=300, network={"allow_out": ["192.0.2.7"], "deny_out": ["0.0.0.0/0"]})
    offline = Sandbox.create(timeout=300, allow_internet_access=False)
    try:
        policy = httpx.get(f"{api}/v1/sandboxes/{listed.sandbox_id}", headers=native).json()["network"]
        assert [(rule["action"], rule["to"]) for rule in policy["rules"]] == [
            ("allow", "192.0.2.7"),
            ("deny", "0.0.0.0/0"),
        ]
        policy = httpx.get(f"{api}/v1/sandboxes/{offline.sandbox_id}", headers=native).json()["network"]
        assert [(rule["action"], rule["to"]) for rule in policy["rules"]] == [("deny", "0.0.0.0/0")]
    finally:
        listed.kill()
        offline.kill()

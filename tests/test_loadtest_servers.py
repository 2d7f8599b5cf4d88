"""`ServerProcess`: any interpreter, ready on `/health`, and nothing of the server left once it stops."""

import sys
import time
from pathlib import Path

import httpx

from loadtest.servers import ServerProcess, free_port

FAKE_SERVER = '''
import http.server, subprocess, sys
from pathlib import Path

child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # as vLLM's engine process
Path(sys.argv[2]).write_text(str(child.pid))


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(sys.executable.encode())


http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
'''


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie no one reaped counts as exited)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def test_a_stopped_server_leaves_no_child_running(tmp_path):
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    port, child_pid = free_port(), tmp_path / "child.pid"
    env = {"PYTHONPATH": str(tmp_path)}
    with ServerProcess("fake server", ["fake_server", str(port), str(child_pid)], port, env, 30, python=sys.executable) as server:
        assert httpx.get(server.url + "/", timeout=5).text == sys.executable
        pid = int(child_pid.read_text())
        assert not gone(pid)
    server.log.unlink()
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid)

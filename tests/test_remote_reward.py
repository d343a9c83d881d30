"""`--reward http://HOST:PORT/PATH`: a scoring service on 127.0.0.1 (a real HTTP server in a thread), its retries,
timeouts and errors, and PPO's check of it before anything starts."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raytrain.errors import DataError
from raytrain.rlhf.actors import call_reward, reward_function
from raytrain.rlhf.remote_reward import RemoteReward


class Scorer(BaseHTTPRequestHandler):
    """/length: len(response) as {"scores"}; /flaky: 503 twice, then scores; /count: one score too few;
    /html: not JSON; /missing: 404; /slow: answers after the client gave up."""

    calls: dict[str, int] = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        calls = Scorer.calls[self.path] = Scorer.calls.get(self.path, 0) + 1
        scores = [float(len(r)) for r in body["responses"]]
        if self.path == "/flaky" and calls <= 2:
            return self._answer(503, b"busy")
        if self.path == "/slow":
            threading.Event().wait(1.0)
        answer = {"/count": json.dumps(scores[:-1]).encode(), "/html": b"<html>oops</html>"}.get(
            self.path, json.dumps({"scores": scores}).encode())
        self._answer(404 if self.path == "/missing" else 200, answer)

    def _answer(self, code: int, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except BrokenPipeError:  # /slow: the client gave up first
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_scoring_service_is_called_retried_and_its_errors_named(service):
    prompts, responses = ["What does len do?", "And zip?"], ["Counts.", "Pairs items up."]
    length = reward_function(f"{service}/length")
    assert isinstance(length, RemoteReward)
    assert call_reward(length, "http", prompts, responses) == [7.0, 15.0]
    flaky = RemoteReward(f"{service}/flaky", backoff_s=0.01)
    assert flaky(prompts, responses) == [7.0, 15.0] and Scorer.calls["/flaky"] == 3  # 503, 503, then scores
    with pytest.raises(DataError, match="returned 1 scores for 2 responses"):
        call_reward(reward_function(f"{service}/count"), f"{service}/count", prompts, responses)
    with pytest.raises(DataError, match="answered no JSON"):
        RemoteReward(f"{service}/html")(prompts, responses)
    with pytest.raises(DataError, match=r"HTTP 404.*after 1 of 4 tries"):  # a client error is not retried
        RemoteReward(f"{service}/missing")(prompts, responses)
    with pytest.raises(DataError, match=r"timed out.*after 2 of 2 tries"):
        RemoteReward(f"{service}/slow", attempts=2, timeout_s=0.2, backoff_s=0.01)(prompts, responses)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(DataError, match=r"refused.*check that the service runs"):
        RemoteReward(f"http://127.0.0.1:{closed}/score", attempts=2, backoff_s=0.01)(prompts, responses)

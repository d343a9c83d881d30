"""A reward served over HTTP: `raytrain ppo --reward http://HOST:PORT/PATH` (or https://).

Each scoring call POSTs one JSON body, `{"prompts": [str, ...], "responses": [str, ...]}`, and expects back
`{"scores": [number, ...]}` (or the bare list), one per response, as a `python:` reward returns them. A connection
that fails, times out or answers 5xx/429 is tried again after a pause (the service may be restarting or busy);
anything else, or the last failure, is a DataError naming the URL and what came back.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from raytrain.errors import DataError

HTTP_REWARDS = ("http://", "https://")
ATTEMPTS = 4  # tries per call
BACKOFF_S = 0.5  # the pause before the second try, doubled for each next one
TIMEOUT_S = 60.0  # per try: a batch of responses to score
SHOWN = 200  # characters of an error body quoted back


class RemoteReward:
    def __init__(self, url: str, attempts: int = ATTEMPTS, timeout_s: float = TIMEOUT_S,
                 backoff_s: float = BACKOFF_S):
        self.url, self.attempts, self.timeout_s, self.backoff_s = url, attempts, timeout_s, backoff_s

    def __call__(self, prompts: list[str], responses: list[str]) -> list:
        body = json.dumps({"prompts": prompts, "responses": responses}).encode()
        failure = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    return self._scores(answer.read())
            except urllib.error.HTTPError as error:
                failure = f"HTTP {error.code}: {error.read()[:SHOWN].decode(errors='replace')}"
                if error.code < 500 and error.code != 429:
                    break  # the request itself is wrong: trying again changes nothing
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                failure = str(getattr(error, "reason", error))
        raise DataError(f"reward '{self.url}': {failure} (after {attempt + 1} of {self.attempts} tries); check that "
                        "the service runs and takes POST {\"prompts\": [...], \"responses\": [...]}")

    def _scores(self, raw: bytes) -> list:
        try:
            answer = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(f"reward '{self.url}' answered no JSON ({raw[:SHOWN]!r}); answer "
                            "{\"scores\": [...]}") from None
        scores = answer.get("scores") if isinstance(answer, dict) else answer
        if not isinstance(scores, list):
            raise DataError(f"reward '{self.url}' answered {str(answer)[:SHOWN]}; answer {{\"scores\": [...]}}, "
                            "one number per response")
        return scores

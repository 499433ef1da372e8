"""Notify: tell people about positive findings by an HTTP webhook (JSON POST).

The webhook URL is a secret (it often carries a token), so it never sits in the main
configuration: ``[notify] webhook_url_env`` names an environment variable, or
``webhook_url_file`` a file whose first line is the URL. It is read at each attempt (a
rotated URL is picked up) and never logged. Retries, backoff and the record of every
attempt are the worker's and the database's business; this module sends one request.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from node import __version__
from node.config.schema import NotifySection
from node.errors import ConfigError, RetryableError

USER_AGENT = f"pacs-ai-node/{__version__}"
_ERROR_BODY_CHARS = 200
_SCHEMES = ("http", "https")


class WebhookError(RetryableError):
    """The webhook could not be reached or did not answer 2xx."""


def webhook_url(section: NotifySection) -> str | None:
    """The webhook URL, or None when no webhook is configured.

    Raises:
        ConfigError: a webhook is configured but its URL is not available or not http(s).
    """
    if section.webhook_url_env:
        url = os.environ.get(section.webhook_url_env, "").strip()
        if not url:
            raise ConfigError(f"notify.webhook_url_env: environment variable {section.webhook_url_env} "
                              "is not set or empty")
        where = f"environment variable {section.webhook_url_env}"
    elif section.webhook_url_file:
        path = Path(section.webhook_url_file)
        try:
            url = path.read_text(encoding="utf-8").strip().splitlines()[0].strip() if path.is_file() else ""
        except (OSError, UnicodeError, IndexError) as exc:
            raise ConfigError(f"notify.webhook_url_file: {path} cannot be read ({exc})") from None
        if not url:
            raise ConfigError(f"notify.webhook_url_file: {path} is missing or empty")
        where = f"file {path}"
    else:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.netloc:
        raise ConfigError(f"notify: the webhook URL in {where} is not an http(s) URL")
    return url


def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> int:
    """POST ``payload`` as JSON; returns the HTTP status (2xx).

    Raises:
        WebhookError: no connection, a timeout, or a status other than 2xx (the message
            names the status and the start of the answer, never the URL).
    """
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT})
    opener = urllib.request.build_opener()      # the environment's proxies, no_proxy honoured
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        detail = exc.read(_ERROR_BODY_CHARS).decode("utf-8", "replace").strip()
        raise WebhookError(f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")) from None
    except urllib.error.URLError as exc:
        raise WebhookError(f"webhook not reachable: {exc.reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise WebhookError(f"webhook not reachable or broke the answer: {type(exc).__name__}: {exc}") from None


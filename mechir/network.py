"""Offline-first network checks shared by model and collection loading.

mechir never waits on retry loops: before anything is downloaded, one quick request (a few
seconds at most) tells whether the host answers at all, and the offline switches of the Hugging
Face libraries (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``) are honoured.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

#: Seconds a reachability check may take before the host counts as unreachable.
REACHABILITY_TIMEOUT_S = 3.0

_TRUE = {"1", "on", "yes", "true"}


def offline_mode() -> str | None:
    """The environment variable that switches the Hugging Face libraries offline
    (``"HF_HUB_OFFLINE=1"``), or None when neither ``HF_HUB_OFFLINE`` nor ``TRANSFORMERS_OFFLINE``
    is set to a true value."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var, "")
        if value.strip().lower() in _TRUE:
            return f"{var}={value}"
    return None


def unreachable(url: str, *, timeout: float = REACHABILITY_TIMEOUT_S) -> str | None:
    """Why ``url`` cannot be reached (one short phrase), or None when its server answers.

    One ``HEAD`` request, no retries, honouring the ``*_proxy`` environment variables. Any HTTP
    answer (even 404) means the host is reachable.
    """
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as err:
        reason = err.reason
        return f"unreachable ({getattr(reason, 'strerror', None) or reason})"
    except TimeoutError:
        return f"unreachable (no answer within {timeout:g} s)"
    except OSError as err:
        return f"unreachable ({err.strerror or err})"

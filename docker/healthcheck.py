"""Container health check: exit 0 only when GET /ready answers 200 (model loaded and warmed), else 1.

Standard library only, so the image needs no curl. Used by the Dockerfile's HEALTHCHECK and compose.yaml.
"""

import os
import sys
import urllib.error
import urllib.request

host = os.environ.get("RERANKER_HOST", "0.0.0.0")
if host in ("", "0.0.0.0", "::", "[::]"):
    host = "127.0.0.1"
elif ":" in host and not host.startswith("["):
    host = f"[{host}]"
url = f"http://{host}:{os.environ.get('RERANKER_PORT', '9300')}/ready"

try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("RERANKER_HEALTHCHECK_TIMEOUT", "4"))) as response:
        sys.exit(0 if response.status == 200 else 1)
except urllib.error.HTTPError as error:  # 503 while loading, warming up or draining
    print(f"{url}: {error.code}", file=sys.stderr)
except Exception as error:  # refused, timed out, reset: any failure means "not healthy"
    print(f"{url}: {error}", file=sys.stderr)
sys.exit(1)

"""`python -m deploy.ray MODEL ADAPTERS [key=value ...]`: run the app on a local Ray until Ctrl-C."""

import sys
import time

from deploy.ray.app import build_app
from ray import serve


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m deploy.ray MODEL ADAPTERS [key=value ...] [host=127.0.0.1] [port=8000]")
    options = dict(arg.split("=", 1) for arg in argv[2:])
    host, port = options.pop("host", "127.0.0.1"), int(options.pop("port", "8000"))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"model": argv[0], "adapters": argv[1], **options}), route_prefix="/")
    print(f"loraplex on Ray Serve at http://{host}:{port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])

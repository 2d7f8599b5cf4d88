"""loraplex on Ray Serve: one engine per replica, adapters routed by Ray's model multiplexing (see README.md)."""

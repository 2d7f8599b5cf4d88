"""What the API drives above the engine: the on-disk adapter store and the catalog of adapters, owners and tenants."""

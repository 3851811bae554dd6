"""In-house plugins used by the tests (enabled by dotted module path)."""

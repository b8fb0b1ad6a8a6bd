"""The store protocol: wire stubs, errors and their status mapping, the record format, framing,
limits, the key spec, host identity and the typed Store interface.

Both ``kvstore`` (the node) and ``kvclient`` (the library) import this package; it imports
neither (``tests/test_import_graph.py`` keeps it so).
"""

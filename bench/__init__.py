"""kvbench: benchmarks of the KV-cache store (economics, transport, topology, reuse, load).

Every scenario returns a `bench.report.Report`; `bench.report.write_report` writes it as JSON (with
the environment), Markdown and PNG. Run them with `kvbench SCENARIO --out DIR` (bench/cli.py).
"""

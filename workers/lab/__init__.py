"""Lab tools: measurements and experiments that drive the serving roles from outside.

bench (latency, throughput, memory), chaos (fault scenarios against real workers), experiment
and coldstart (online quality protocols), evaluate (offline quality), demo, badinput (hostile
records). They import the roles and the runtime; no role imports them
(tests/test_architecture.py). The `streamrec` CLI is the one place that reaches both.
"""

"""Test helpers that ship with the contract: private brokers, artifact builder, device simulator.

The demo, the benchmarks, ``edge-fleet simulate`` and the tests use them; they import only
``edgefleet`` (a simulated device runs the agent's own command rules from :mod:`edgefleet.commands`).
"""

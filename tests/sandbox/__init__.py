"""Tests of the gateway simulators (`sandbox/`) over real HTTP."""

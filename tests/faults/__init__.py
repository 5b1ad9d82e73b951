"""Fault-injection suite: real processes, real servers, loopback only."""

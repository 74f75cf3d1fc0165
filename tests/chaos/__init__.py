"""Chaos-test harness: fault proxies in front of replicas, a chaos service, open-loop load."""

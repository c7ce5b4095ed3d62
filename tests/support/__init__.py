"""Helpers shared by the test tiers: real services started on 127.0.0.1, waits with
deadlines."""

"""Harnesses shared by the test tiers."""

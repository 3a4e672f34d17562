"""Similarity clusters: the coordinator's assignment and a volunteer's part in it."""

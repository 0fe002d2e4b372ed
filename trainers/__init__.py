"""Trainers: one file per method (a strict config and a readable loop) plus pure shared helpers."""

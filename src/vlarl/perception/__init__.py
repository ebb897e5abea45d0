"""Perception: camera frames and proprioception -> a stamped observation vector."""

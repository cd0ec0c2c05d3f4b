"""Load producer and the demo that drives a whole fleet."""

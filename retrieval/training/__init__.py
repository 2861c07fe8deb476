"""Training an embedding network: loop, objectives, schedule, random state, several processes."""

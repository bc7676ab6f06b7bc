"""synthmed's own generators and the surface they share."""

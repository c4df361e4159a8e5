"""Parallelism: the mesh, logical axis names and their shardings (`sharding`), and reading
compiled programs for their collectives and memory (`hlo`)."""

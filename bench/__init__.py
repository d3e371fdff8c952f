"""Benchmarks that compare svidgate with nginx in the same run (not tests); see README.md."""

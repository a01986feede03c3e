"""Test helpers shared by every test package (broker, subprocess, waiting)."""

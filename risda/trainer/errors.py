"""The error a run raises for bad input: caught before any expensive work, one line naming the fix.

Its own module so that every layer (the Config, the objectives, the arm registry) can raise it
without importing the others.
"""


class ConfigError(ValueError):
    """Bad input, caught before any expensive work starts. The message names the fix."""

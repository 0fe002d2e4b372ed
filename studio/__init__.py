"""Personalization Studio: teach a text-to-image model your own subjects, styles and taste.

The core package holds configuration (the studio home), base-model loading and model families, adapter files and
their formats, the adapter library, the shapes world and the command line.
"""

__version__ = "0.1.0"

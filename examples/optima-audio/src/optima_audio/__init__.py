"""optima-audio: an example third-party OPTIMA plugin (see `optima_audio.plugin`)."""
__version__ = "0.1.0"

"""optima-video: an example third-party OPTIMA plugin (see `optima_video.plugin`)."""
__version__ = "0.1.0"

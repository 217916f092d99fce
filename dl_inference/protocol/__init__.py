"""Wire protocol: generated V2 stubs and codecs between wire formats and numpy."""

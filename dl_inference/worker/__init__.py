"""Worker processes: one model instance each, fed by the gateway over framed Unix sockets or by V2 gRPC."""

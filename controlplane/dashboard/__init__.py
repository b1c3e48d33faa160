"""The dashboard's HTTP server: static app, browser login, gRPC-Web to the gRPC API."""

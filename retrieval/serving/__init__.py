"""Searching an index from the outside: the search service, the HTTP server and its web page."""
